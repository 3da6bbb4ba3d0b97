"""scripts/install_plan.py: where torch's CPU build comes from, and which installs get the overrides."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import pytest

pytestmark = pytest.mark.unit
SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "install_plan.py"
WHEEL = "torch-2.13.0+cpu-cp311-cp311-manylinux_2_28_x86_64.whl"


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("install_plan", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["install_plan"] = module  # dataclasses look their module up by name
    spec.loader.exec_module(module)
    return module


ip = _load()


def _plan(extras: str, sources: object, has_torch: bool, env: dict[str, str] | None = None) -> list[str]:
    return list(ip.plan(extras, env or {}, sources, lambda _s: has_torch))


def test_pip_config_listing_parsed_with_pip_precedence() -> None:
    listing = "\n".join(
        [
            "global.cert='/etc/ssl/certs/ca.crt'",
            "global.find-links='/opt/wheels'",
            "user.find-links='/home/me/wheels'",
            "global.extra-index-url='file:///opt/pypi/simple file:///opt/more/simple'",
            ":env:.index-url='https://pypi.corp/simple'",
            "site.index-url='https://ignored/simple'",
        ]
    )
    assert ip.parse_pip_config(listing) == {
        "find-links": "/home/me/wheels",
        "extra-index-url": "file:///opt/pypi/simple file:///opt/more/simple",
        "index-url": "https://pypi.corp/simple",
    }


def test_environment_beats_config_key_by_key() -> None:
    sources = ip.pip_sources(
        {"PIP_FIND_LINKS": "/a /b"}, {"find-links": "/opt/wheels", "extra-index-url": "https://x/simple"}
    )
    assert sources.find_links == ["/a", "/b"]
    assert sources.extra_index_urls == ["https://x/simple"]
    assert sources.uv_args() == [
        "--find-links", "/a", "--find-links", "/b",
        "--extra-index-url", "https://x/simple", "--index-strategy", "unsafe-best-match",
    ]  # fmt: skip


def test_cpu_with_a_local_torch_wheel_pins_it_with_overrides() -> None:
    sources = ip.PipSources(find_links=["/wheels"])
    assert _plan("cpu,test", sources, has_torch=True) == [
        "--find-links", "/wheels", "--override", "scripts/overrides.txt", "torch==2.13.0+cpu", "-e", ".[cpu,test]",
    ]  # fmt: skip


def test_cpu_without_a_local_wheel_uses_pytorch_cpu_index_or_the_named_mirror() -> None:
    plain = _plan("cpu", ip.PipSources(), has_torch=False)
    assert plain == ["--override", "scripts/overrides.txt", "--torch-backend", "cpu", "-e", ".[cpu]"]
    mirrored = _plan("cpu", ip.PipSources(), has_torch=False, env={"HUBSERVE_TORCH_INDEX": "https://torch.corp/cpu"})
    assert mirrored[2:5] == ["--index", "https://torch.corp/cpu", "torch==2.13.0+cpu"]
    assert "--torch-backend" not in mirrored


def test_gpu_installs_vllm_cuda_build_without_overrides_and_never_the_local_cpu_torch() -> None:
    args = _plan("gpu,test", ip.PipSources(index_url="https://pypi.corp/simple"), has_torch=False)
    assert args == ["--index-url", "https://pypi.corp/simple", "-e", ".[gpu,test]"]
    local = _plan("gpu", ip.PipSources(find_links=["/wheels"]), has_torch=True)
    assert local == ["--find-links", "/wheels", "torch!=2.13.0+cpu", "-e", ".[gpu]"]


def test_cpu_and_gpu_together_is_refused() -> None:
    with pytest.raises(ValueError, match="not both"):
        _plan("cpu,gpu", ip.PipSources(), has_torch=False)


def test_local_wheel_found_in_find_links_folder_and_file_index(tmp_path: Path) -> None:
    folder = tmp_path / "wheels"
    folder.mkdir()
    assert not ip.has_cpu_torch(ip.PipSources(find_links=[str(folder), "https://remote/wheels"]))
    (folder / WHEEL).touch()
    assert ip.has_cpu_torch(ip.PipSources(find_links=[folder.as_uri()]))
    index = tmp_path / "simple"
    (index / "torch").mkdir(parents=True)
    (index / "torch" / "index.html").write_text(f'<a href="../../{WHEEL}">{WHEEL}</a>')
    assert ip.has_cpu_torch(ip.PipSources(extra_index_urls=[index.as_uri()]))


def _run_script(tmp_path: Path, **env: str) -> list[str]:
    """The script as setup.sh runs it, with pip's config files switched off and only ``env`` as pip config."""
    base = {k: v for k, v in os.environ.items() if not k.startswith(("PIP_", "HUBSERVE_"))}
    base |= {"PIP_CONFIG_FILE": os.devnull, **env}
    done = subprocess.run(
        [sys.executable, str(SCRIPT), "cpu,test"], env=base, capture_output=True, text=True, check=True, timeout=120
    )
    return done.stdout.split()


def test_script_reads_pip_find_links_from_the_environment(tmp_path: Path) -> None:
    assert "--torch-backend" in _run_script(tmp_path)  # a fresh machine: PyTorch's CPU index
    (tmp_path / WHEEL).touch()
    args = _run_script(tmp_path, PIP_FIND_LINKS=str(tmp_path))
    assert args[:2] == ["--find-links", str(tmp_path)]
    assert "torch==2.13.0+cpu" in args and "--torch-backend" not in args

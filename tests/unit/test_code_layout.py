"""The package rules of ARCHITECTURE.md, read from the source with ``ast``: API families import none of each
other (they share errors, admission and engines/client.py), engines/ imports no family, sync/ nothing of
server/, and routes never import vLLM."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
ROOT = Path(__file__).resolve().parents[2]
FAMILIES = ("openai", "anthropic", "tgi", "hub")


def imports(folder: Path) -> dict[str, set[str]]:
    """Module path → every module it imports (top level and inside functions)."""
    out: dict[str, set[str]] = {}
    for path in folder.rglob("*.py"):
        names: set[str] = set()
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names |= {a.name for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names.add(node.module)
        out[str(path.relative_to(ROOT))] = names
    return out


@pytest.mark.parametrize("family", FAMILIES)
def test_families_import_none_of_each_other(family: str) -> None:
    others = tuple(f"server.{f}" for f in FAMILIES if f != family)
    wrong = {mod: sorted(n for n in names if n.startswith(others))
             for mod, names in imports(ROOT / "server" / family).items()}
    assert not {m: n for m, n in wrong.items() if n}, "families share only errors, admission and engines/client"


def test_engines_and_sync_stay_below_the_families() -> None:
    families = tuple(f"server.{f}" for f in FAMILIES)
    engines = {m: sorted(n for n in names if n.startswith(families))
               for m, names in imports(ROOT / "server" / "engines").items()}
    assert not {m: n for m, n in engines.items() if n}
    sync = {m: sorted(n for n in names if n.startswith("server")) for m, names in imports(ROOT / "sync").items()}
    assert not {m: n for m, n in sync.items() if n}
    routes = {m: sorted(n for n in names if n.startswith("vllm"))
              for m, names in imports(ROOT / "server").items() if m.endswith("routes.py")}
    assert not {m: n for m, n in routes.items() if n}

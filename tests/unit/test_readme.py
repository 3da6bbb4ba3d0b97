"""The README as a manual that stays true: its CLI blocks run, every command's --help has an example, every
setting and models.toml key is documented with its default, and the models.toml reference parses."""

from __future__ import annotations

import enum
import os
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel
from typer.main import get_command
from typer.testing import CliRunner

from server.cli import app
from server.settings import Settings
from sync.manifest import DaemonConfig, ModelSpec, StoreConfig, UpstreamConfig, parse_manifest
from tests.fixtures.readme import README, blocks

pytestmark = pytest.mark.unit
TEXT = README.read_text(encoding="utf-8")


def test_every_command_help_has_an_example() -> None:
    commands = sorted(get_command(app).commands)  # type: ignore[attr-defined]
    assert {"sync", "serve", "mirror"} <= set(commands)
    runner = CliRunner()
    for name in [None, *commands]:
        result = runner.invoke(app, [name, "--help"] if name else ["--help"], env={"COLUMNS": "200"})
        assert result.exit_code == 0, (name, result.output)
        assert "Example" in result.output or "example" in result.output, f"`hubserve {name} --help` has no example"
        assert name is None or f"hubserve {name}" in TEXT, f"the README never shows `hubserve {name}`"


@pytest.mark.parametrize("block", [b for b in blocks() if b.mark == "cli"], ids=lambda b: f"README:{b.line}")
def test_cli_blocks_run(block: object, tmp_path: Path) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "COLUMNS": "200"}
    for line in block.code.splitlines():  # type: ignore[attr-defined]
        command = line.split("  #")[0].strip()
        if command:
            done = subprocess.run(shlex.split(command), cwd=tmp_path, env=env, capture_output=True, text=True,
                                  timeout=120)  # fmt: skip
            assert done.returncode == 0, f"README: `{command}` failed: {done.stderr[-2000:]}"


def test_client_snippets_exist_for_each_client() -> None:
    server = "\n".join(b.code for b in blocks() if b.mark == "server")
    for client in ("curl ", "from openai import OpenAI", "from huggingface_hub import InferenceClient"):
        assert client in server, f"no runnable README snippet uses {client!r}"


def _default(value: object) -> str:
    if value is None or value == frozenset():
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, enum.Enum):
        return str(value.value)
    return f"{value:g}" if isinstance(value, float) else str(value)


@pytest.mark.parametrize("name", list(Settings.model_fields))
def test_every_setting_is_documented_with_its_default(name: str) -> None:
    row = next((ln for ln in TEXT.splitlines() if ln.startswith(f"| `HUBSERVE_{name.upper()}` |")), None)
    assert row is not None, f"HUBSERVE_{name.upper()} missing from the README's settings table"
    assert row.split("|")[2].strip() == _default(Settings.model_fields[name].default)


def test_models_toml_reference_parses_and_names_every_key() -> None:
    reference = next(b.code for b in blocks() if b.lang == "toml" and b.code.startswith("[store]"))
    parse_manifest(reference, "README.md")
    model: type[BaseModel]
    for model in (StoreConfig, UpstreamConfig, DaemonConfig, ModelSpec):
        for key in model.model_fields:
            assert f"\n{key} = " in "\n" + reference or f"[models.{key}]" in reference, f"{model.__name__}.{key}"

"""Pure pieces of the server: start waves under a memory budget, engine flags, CPU defaults, path families."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from server.engines.base import ModelInfo
from server.engines.vllm import effective_engine_args, engine_flags
from server.lifecycle import start_waves
from server.settings import Device, Settings
from sync.errors import ConfigError

pytestmark = pytest.mark.unit
GIB = 1024**3


def test_start_waves_fit_the_budget() -> None:
    assert start_waves([3, 3, 3], budget=10) == [[0, 1, 2]]
    assert start_waves([3, 3, 3], budget=7) == [[0, 1], [2]]
    assert start_waves([20, 1], budget=10) == [[0], [1]]  # too big alone still starts, on its own
    assert start_waves([1, 1, 1], budget=100, max_parallel=1) == [[0], [1], [2]]
    assert start_waves([], budget=1) == []


def test_engine_flags() -> None:
    flags = engine_flags(
        {
            "max_model_len": 2048,
            "enforce_eager": True,
            "enable_prefix_caching": False,
            "quantization": None,
            "allowed_origins": ["a", "b"],
            "hf_overrides": {"x": 1},
        }
    )
    assert flags == [
        "--max-model-len",
        "2048",
        "--enforce-eager",
        "--allowed-origins",
        "a",
        "b",
        "--hf-overrides",
        '{"x": 1}',
    ]


def _info(tmp_path: Path, task: str = "text-generation", **engine: object) -> ModelInfo:
    (tmp_path / "config.json").write_text(json.dumps({"max_position_embeddings": 512}))
    return ModelInfo(name="m", repo="o/m", commit="c" * 40, task=task, snapshot=str(tmp_path), engine_args=engine)


def test_cpu_defaults(tmp_path: Path) -> None:
    settings = Settings()
    args = effective_engine_args(_info(tmp_path), Device.CPU, settings)
    assert args == {"dtype": "float32", "enforce_eager": True, "max_model_len": 512}  # bounded by the model
    args = effective_engine_args(_info(tmp_path, dtype="auto", enforce_eager=False), Device.CPU, settings)
    assert args["dtype"] == "float32" and args["enforce_eager"] is False
    assert "max_model_len" not in effective_engine_args(_info(tmp_path, "feature-extraction"), Device.CPU, settings)
    assert effective_engine_args(_info(tmp_path, dtype="bfloat16"), Device.GPU, settings) == {"dtype": "bfloat16"}


def test_reserved_engine_args_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="may not set model"):
        effective_engine_args(_info(tmp_path, model="other"), Device.CPU, Settings())


def test_start_failure_names_the_root_cause() -> None:
    from server.engines.process import _cause

    lines = [
        "Traceback (most recent call last):",
        "pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig",
        "  Value error, max_model_len too big",
        "(APIServer pid=7) RuntimeError: Engine core initialization failed. See root cause above.",
    ]
    assert _cause(lines) == (
        ": pydantic_core._pydantic_core.ValidationError: 1 validation error for ModelConfig | "
        "Value error, max_model_len too big"
    )
    assert _cause(["a", "b"]) == "; last output: a | b"

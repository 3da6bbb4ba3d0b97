"""Issue 16, the gateway side, as pure functions: what engines inherit from the gateway's environment."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import ValidationError

from server.engines.process import offline_environment
from server.settings import Settings

SNAPSHOT = str(Path("/store/models--o--n/snapshots") / ("c" * 40))
PASSED = {
    "PATH": "/usr/bin", "PYTHONPATH": "/src", "LANG": "C.UTF-8", "LC_ALL": "C.UTF-8", "TZ": "UTC",
    "CUDA_VISIBLE_DEVICES": "0", "NCCL_DEBUG": "WARN", "VLLM_LOGGING_LEVEL": "INFO", "OMP_NUM_THREADS": "4",
    "RAY_ADDRESS": "10.0.0.5:6379", "HF_HUB_ENABLE_HF_TRANSFER": "0", "TOKENIZERS_PARALLELISM": "false",
}
WITHHELD = {
    "HF_TOKEN": "hf_a", "HUGGING_FACE_HUB_TOKEN": "hf_b", "HF_HUB_TOKEN": "hf_c", "HUBSERVE_API_KEYS": "k",
    "CORP_HUB_CRED": "custom token_env", "AWS_SECRET_ACCESS_KEY": "s", "OPENAI_API_KEY": "sk", "VLLM_API_KEY": "v",
    "GITHUB_TOKEN": "g", "DATABASE_URL": "postgres://u:p@h/db", "MY_LIB_MODE": "fast", "NCCL_PASSWORD": "x",
}


@pytest.fixture
def environ(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in list(__import__("os").environ):
        monkeypatch.delenv(name)
    for name, value in {**PASSED, **WITHHELD}.items():
        monkeypatch.setenv(name, value)


@pytest.mark.usefixtures("environ")
def test_engines_inherit_an_allow_list_and_never_a_token() -> None:
    env = offline_environment(SNAPSHOT)
    assert {k: env[k] for k in PASSED if k in env} == PASSED
    leaked = sorted(set(WITHHELD) & set(env))
    assert not leaked, leaked
    assert env["HF_HUB_OFFLINE"] == "1" and env["HF_HUB_CACHE"] == "/store"


@pytest.mark.usefixtures("environ")
def test_the_operator_names_more_but_never_a_credential() -> None:
    env = offline_environment(SNAPSHOT, Settings(engine_env="MY_LIB_*, DATABASE_URL").engine_env)  # type: ignore[arg-type]
    assert env["MY_LIB_MODE"] == "fast" and env["DATABASE_URL"].startswith("postgres")
    assert "HF_TOKEN" not in offline_environment(SNAPSHOT, ("*",))  # even a catch-all pattern passes no token
    for bad in ("HF_TOKEN", "CORP_API_KEY", "x,DB_PASSWORD"):
        with pytest.raises(ValidationError, match="never get a credential"):
            Settings(engine_env=bad)  # type: ignore[arg-type]


async def test_token_level_tasks_on_vllm_cap_their_input_before_tokenizing() -> None:
    from server.engines.base import ModelInfo
    from server.errors import RequestTooLarge
    from server.hub import on_vllm
    from server.tasks.requests import parse_task
    from tests.fixtures.scripted_engine import ScriptedEngine
    from tests.fixtures.tiny import minilm_dir

    def never(_request: object) -> object:
        raise AssertionError("the engine must not be asked")

    info = ModelInfo("m", "o/m", "0" * 40, "fill-mask", str(minilm_dir()))
    engine = ScriptedEngine(info, never)  # type: ignore[arg-type]
    fill = parse_task("fill-mask", {"inputs": "x [MASK] " * 100}, "m")
    with pytest.raises(RequestTooLarge, match="HUBSERVE_MAX_TOKENIZE_CHARS"):
        await on_vllm.fill_mask(engine, fill, max_chars=50)  # type: ignore[arg-type]
    entities = parse_task("token-classification", {"inputs": ["a b c " * 10, "d e f " * 10]}, "m")
    with pytest.raises(RequestTooLarge):
        await on_vllm.token_classification(engine, entities, max_chars=100)  # type: ignore[arg-type]

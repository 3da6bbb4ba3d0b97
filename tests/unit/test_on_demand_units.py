"""Pure parts of loading on demand and LoRA adapters: the adapter fit check, vLLM's LoRA rank, the stream renamer,
the X-Scale-Up-Timeout header, eviction order and what counts as the same engine."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from server.engines.base import ModelInfo
from server.lifecycle import same_engine
from server.ops.context import scale_up_timeout
from server.proxy import ModelRename
from sync.adapters import check_adapter, engine_lora_rank, in_folder
from sync.errors import ConfigError
from sync.manifest import parse_manifest

pytestmark = pytest.mark.unit

BASE = "org/base"


def _safetensors(path: Path, shapes: dict[str, list[int]]) -> None:
    header = json.dumps({k: {"dtype": "F32", "shape": v, "data_offsets": [0, 0]} for k, v in shapes.items()}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header)


def _pair(tmp_path: Path, a_in: int = 64, b_out: int = 64, named: str = BASE, r: int = 8) -> tuple[Path, Path]:
    base, adapter = tmp_path / "base", tmp_path / "adapter"
    base.mkdir()
    adapter.mkdir()
    _safetensors(base / "model.safetensors", {"model.layers.0.self_attn.q_proj.weight": [64, 64]})
    _safetensors(adapter / "adapter_model.safetensors", {
        "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight": [r, a_in],
        "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight": [b_out, r],
    })
    (adapter / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": r, "base_model_name_or_path": named, "target_modules": ["q_proj"]}))
    return base, adapter


def test_an_adapter_that_fits_gives_its_rank(tmp_path: Path) -> None:
    base, adapter = _pair(tmp_path, r=16)
    facts = check_adapter(in_folder(adapter), in_folder(base), "'poet'", BASE, "'base'")
    assert facts.rank == 16 and facts.target_modules == ("q_proj",)


@pytest.mark.parametrize(("kw", "says"), [
    ({"named": "org/other"}, "trained on 'org/other', not org/base"),
    ({"a_in": 32}, "does not fit the base weight model.layers.0.self_attn.q_proj.weight of shape [64, 64]"),
    ({"b_out": 128}, "lora_B.weight has shape [128, 8]"),
])
def test_an_adapter_that_does_not_fit_is_refused_naming_both(tmp_path: Path, kw: dict[str, object], says: str) -> None:
    base, adapter = _pair(tmp_path, **kw)  # type: ignore[arg-type]
    with pytest.raises(ConfigError) as e:
        check_adapter(in_folder(adapter), in_folder(base), "'poet' (org/poet)", BASE, "'base' (org/base)")
    assert "adapter 'poet' (org/poet) does not fit its base model 'base' (org/base)" in str(e.value)
    assert says in str(e.value)


def test_a_local_training_path_of_the_base_is_accepted(tmp_path: Path) -> None:
    base, adapter = _pair(tmp_path, named="/home/me/.cache/huggingface/hub/models--org--base/snapshots/abc")
    assert check_adapter(in_folder(adapter), in_folder(base), "a", BASE, "b").rank == 8


def test_lora_rank_is_one_vllm_accepts_with_room_to_grow() -> None:
    assert engine_lora_rank([]) == 16 and engine_lora_rank([8]) == 16 and engine_lora_rank([17]) == 32
    assert engine_lora_rank([64, 8]) == 64 and engine_lora_rank([300]) == 320
    with pytest.raises(ConfigError):
        engine_lora_rank([1024])


def test_the_renamer_finds_the_name_across_any_cut_of_the_stream() -> None:
    stream = b'data: {"model":"poet@0123456789ab","x":1}\n\ndata: {"model":"poet@0123456789ab"}\n\ndata: [DONE]\n\n'
    want = stream.replace(b"poet@0123456789ab", b"poet")
    for cut in range(1, len(stream)):
        rename = ModelRename("poet@0123456789ab", "poet")
        out = rename.feed(stream[:cut]) + rename.feed(stream[cut:]) + rename.flush()
        assert out == want, cut
    one_byte = ModelRename("poet@0123456789ab", "poet")
    assert b"".join(one_byte.feed(bytes([c])) for c in stream) + one_byte.flush() == want


def test_scale_up_timeout_header() -> None:
    assert scale_up_timeout("0") == 0.0 and scale_up_timeout(" 12.5 ") == 12.5
    assert scale_up_timeout(None) is None and scale_up_timeout("-1") is None and scale_up_timeout("1e9") is None
    assert scale_up_timeout("\r\nx") is None


def test_load_policy_changes_need_no_new_engine() -> None:
    a = ModelInfo("m", "o/m", "0" * 40, "text-generation", "/s")
    b = ModelInfo("m", "o/m", "0" * 40, "text-generation", "/s", on_demand=True, idle_unload_s=5)
    assert same_engine(a, b)
    assert not same_engine(a, ModelInfo("m", "o/m", "0" * 40, "text-generation", "/s", max_lora_rank=16))


def test_adapters_in_models_toml() -> None:
    m = parse_manifest('[[models]]\nname = "b"\nrepo = "o/b"\nload = "on-demand"\nidle_unload_s = 30\n'
                       '[[models.adapters]]\nname = "p"\nrepo = "o/p"\nrevision = "v1"\nfollow = true\n')
    assert [s.name for s in m.pinned] == ["b", "p"] and m.base_of("p") == m.models[0] and m.base_of("b") is None
    assert m.model("p").include == ["adapter_config.json", "adapter_model.safetensors", "README.md"]
    with pytest.raises(ConfigError, match="duplicate model names"):
        parse_manifest('[[models]]\nname = "b"\nrepo = "o/b"\n[[models.adapters]]\nname = "b"\nrepo = "o/p"\n')
    with pytest.raises(ConfigError, match="load policy"):
        parse_manifest('[[models]]\nname = "b"\nrepo = "o/b"\nload = "lazy"\n')
    with pytest.raises(ConfigError, match="served on vLLM"):
        parse_manifest('[[models]]\nname = "b"\nrepo = "o/b"\nbackend = "transformers"\n'
                       '[[models.adapters]]\nname = "p"\nrepo = "o/p"\n')


def test_engine_flags_for_adapters_and_sleep_mode(tmp_path: Path) -> None:
    import dataclasses

    from server.engines.vllm import effective_engine_args
    from server.settings import Device, Settings

    settings = Settings()
    info = ModelInfo("m", "o/m", "c" * 40, "text-generation", str(tmp_path))
    lora = effective_engine_args(dataclasses.replace(info, max_lora_rank=16), Device.CPU, settings)
    assert lora["enable_lora"] is True and lora["max_lora_rank"] == 16 and lora["max_loras"] == settings.max_loras
    assert "enable_lora" not in effective_engine_args(info, Device.CPU, settings)
    on_demand = dataclasses.replace(info, on_demand=True)
    assert effective_engine_args(on_demand, Device.GPU, settings).get("enable_sleep_mode") is True
    assert "enable_sleep_mode" not in effective_engine_args(on_demand, Device.CPU, settings)  # CPU: stop and start
    assert "enable_sleep_mode" not in effective_engine_args(info, Device.GPU, settings)  # resident: never sleeps
    no_sleep = Settings(gpu_sleep=False)  # type: ignore[call-arg]
    assert "enable_sleep_mode" not in effective_engine_args(on_demand, Device.GPU, no_sleep)


async def test_an_adapter_the_engine_refused_is_served_again_once_a_restart_loads_it(tmp_path: Path) -> None:
    import httpx

    from server.engines.base import AdapterInfo
    from server.engines.lora import AdapterSet
    from tests.fixtures.scripted_engine import ScriptedEngine

    answers = iter([httpx.Response(500, text="refused"), httpx.Response(200, text="Success")])
    client = httpx.AsyncClient(transport=httpx.MockTransport(lambda _r: next(answers)), base_url="http://engine")
    base = ScriptedEngine(ModelInfo("m", "o/m", "0" * 40, "text-generation", str(tmp_path)), lambda _r: None)  # type: ignore[arg-type,return-value]
    adapters = AdapterSet(base, drain_timeout_s=1.0)
    await adapters.apply([AdapterInfo("p", "o/p", "1" * 40, str(tmp_path), "m", 8)])  # no process yet
    await adapters.load_all(client)  # the engine refuses it: 503 with the reason
    assert adapters.lookup("p").unloaded  # type: ignore[union-attr]
    await adapters.load_all(client)  # the engine's next process loads it
    assert not adapters.lookup("p").unloaded  # type: ignore[union-attr]

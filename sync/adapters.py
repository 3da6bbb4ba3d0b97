"""Whether a PEFT LoRA adapter fits its base model: read from the two snapshots, never loaded.

Checked by sync before an adapter's revision is pinned, and by the server before it is served: the adapter's
``base_model_name_or_path`` must name the base repo, and every LoRA tensor must fit the base weight it adapts
(``lora_A``: ``[r, in_features]``, ``lora_B``: ``[out_features, r]`` of a base ``[out_features, in_features]``).
Only the JSON headers of the safetensors files are read (bounded), so the check costs milliseconds.
"""

from __future__ import annotations

import json
import re
import struct
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sync.errors import ConfigError

MAX_HEADER_BYTES = 64 * 1024**2  # safetensors' own limit is 100 MB; a LoRA's header is a few KB
MAX_JSON_BYTES = 16 * 1024**2
LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<part>A|B)(?:\.[^.]+)?\.weight$")

Resolve = Callable[[str], Path | None]  # a file of the revision by its path in the repo, None when absent


@dataclass(frozen=True)
class AdapterFacts:
    """What serving an adapter needs to know about it."""

    rank: int  # the largest LoRA rank (``r`` and any ``rank_pattern``)
    target_modules: tuple[str, ...]


def _read_json(path: Path, what: str) -> dict[str, Any]:
    if path.stat().st_size > MAX_JSON_BYTES:
        raise ConfigError(f"{what} is larger than {MAX_JSON_BYTES // 1024**2} MiB")
    try:
        data = json.loads(path.read_bytes())
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{what} is not valid JSON ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{what} is not a JSON object")
    return data


def tensor_shapes(path: Path) -> dict[str, list[int]]:
    """Tensor name → shape, from a safetensors file's header (the tensors themselves are not read)."""
    with path.open("rb") as f:
        raw = f.read(8)
        if len(raw) != 8:
            raise ConfigError(f"{path.name} is not a safetensors file (too short)")
        (size,) = struct.unpack("<Q", raw)
        if size > MAX_HEADER_BYTES:
            raise ConfigError(f"{path.name}: safetensors header of {size} bytes is too large")
        header = f.read(size)
    try:
        data = json.loads(header)
    except (ValueError, UnicodeDecodeError) as e:
        raise ConfigError(f"{path.name}: unreadable safetensors header ({e})") from e
    if not isinstance(data, dict):
        raise ConfigError(f"{path.name}: unreadable safetensors header")
    return {k: list(v.get("shape", [])) for k, v in data.items() if k != "__metadata__" and isinstance(v, dict)}


def base_shapes(resolve: Resolve) -> dict[str, list[int]]:
    """Every weight's shape of a base model (one ``model.safetensors`` or a sharded index)."""
    single = resolve("model.safetensors")
    if single is not None:
        return tensor_shapes(single)
    index = resolve("model.safetensors.index.json")
    if index is None:
        raise ConfigError("the base model has no safetensors weights (model.safetensors or its index)")
    weight_map = _read_json(index, "model.safetensors.index.json").get("weight_map", {})
    shapes: dict[str, list[int]] = {}
    for shard in sorted(set(weight_map.values()) if isinstance(weight_map, dict) else ()):
        path = resolve(str(shard))
        if path is None:
            raise ConfigError(f"the base model's shard {shard} is missing")
        shapes |= tensor_shapes(path)
    return shapes


def _same_repo(named: str, repo: str) -> bool:
    """Whether ``base_model_name_or_path`` names ``repo``: the repo id itself, or a local checkout/cache of it
    (a path ending in the repo id, or in ``models--org--name``/its snapshot)."""
    named = named.strip().rstrip("/")
    if named.lower() == repo.lower():
        return True
    if not named.startswith(("/", ".", "~")) and "\\" not in named:
        return False  # another repo id
    flat = "models--" + repo.replace("/", "--")
    return named.lower().endswith("/" + repo.lower()) or flat.lower() in named.lower()


def check_adapter(adapter: Resolve, base: Resolve, adapter_label: str, base_repo: str, base_label: str) -> AdapterFacts:
    """The adapter's facts if it fits the base; ConfigError naming both otherwise."""
    where = f"adapter {adapter_label} does not fit its base model {base_label}"
    config_path = adapter("adapter_config.json")
    weights = adapter("adapter_model.safetensors")
    if config_path is None or weights is None:
        raise ConfigError(f"{where}: a PEFT LoRA adapter needs adapter_config.json and adapter_model.safetensors")
    config = _read_json(config_path, "adapter_config.json")
    if str(config.get("peft_type", "LORA")).upper() != "LORA":
        raise ConfigError(f"{where}: it is a {config.get('peft_type')} adapter; only LoRA adapters are served")
    if config.get("use_dora"):
        raise ConfigError(f"{where}: DoRA adapters are not served by vLLM")
    named = config.get("base_model_name_or_path")
    if isinstance(named, str) and named and not _same_repo(named, base_repo):
        raise ConfigError(f"{where}: it was trained on {named!r}, not {base_repo}")
    ranks = [config.get("r"), *list((config.get("rank_pattern") or {}).values())]
    if not all(isinstance(r, int) and r > 0 for r in ranks):
        raise ConfigError(f"{where}: adapter_config.json has no positive integer rank `r`")
    shapes = tensor_shapes(weights)
    base_weights = base_shapes(base)
    adapted = 0
    for key, shape in shapes.items():
        match = LORA_KEY.match(key)
        if match is None:
            continue  # lora_embedding_*, biases, ...: checked by the engine when it loads them
        module, part = match["module"], match["part"]
        target = base_weights.get(module + ".weight")
        if target is None:
            raise ConfigError(f"{where}: it adapts {module}, which the base model does not have")
        if len(shape) != 2 or len(target) != 2:
            raise ConfigError(f"{where}: {key} has shape {shape}, the base weight {target}")
        fits = shape[1] == target[1] if part == "A" else shape[0] == target[0]
        if not fits:
            raise ConfigError(f"{where}: {key} has shape {shape}, which does not fit the base weight "
                              f"{module}.weight of shape {target}")
        adapted += 1
    if not adapted:
        raise ConfigError(f"{where}: adapter_model.safetensors holds no LoRA weights")
    targets = config.get("target_modules") or ()
    return AdapterFacts(rank=max(int(r) for r in ranks), target_modules=tuple(sorted(
        [targets] if isinstance(targets, str) else [str(t) for t in targets])))


def in_folder(folder: Path) -> Resolve:
    """Files of a snapshot (or any local folder) by their path in the repo."""

    def resolve(path: str) -> Path | None:
        candidate = folder / path
        return candidate if candidate.is_file() else None

    return resolve


# vLLM's --max-lora-rank accepts these values only.
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def engine_lora_rank(ranks: list[int], floor: int = 16) -> int:
    """The ``--max-lora-rank`` an engine starts with for adapters of these ranks: the smallest value vLLM accepts
    that holds them all, at least ``floor`` so that adding a small adapter later needs no restart. Pure."""
    need = max([floor, *ranks])
    for value in LORA_RANKS:
        if value >= need:
            return value
    raise ConfigError(f"a LoRA rank of {need} is more than vLLM serves ({LORA_RANKS[-1]})")

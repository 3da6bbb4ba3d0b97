"""What should be served now: the one reader of sync's files (models.toml, models.lock, the store's records).

``desired_models(config)`` turns the manifest, the lock and the store into ModelInfo (one per model whose pinned
revision is verified) and AdapterInfo (one per LoRA adapter that is verified and fits its base), with the reason
for everything that cannot be served yet. The registry and the lifecycle never read sync's files themselves.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path

from server.engines.base import AdapterInfo, ModelInfo
from server.errors import ModelNotVerified
from server.tasks.catalog import GENERATIVE_TASKS
from sync.adapters import check_adapter, engine_lora_rank, in_folder
from sync.errors import ConfigError
from sync.integrity import is_corrupt
from sync.lock import Lock, pinned_commit, read_lock
from sync.manifest import DEFAULT_CACHE_TTL_S, AdapterSpec, AliasSpec, Config, ModelSpec
from sync.store import Store

log = logging.getLogger("hubserve.desired")

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".gguf")
DEFAULT_TASK = "text-generation"  # a model with no `task` whose repo has no pipeline_tag


@dataclasses.dataclass(frozen=True)
class Desired:
    """What the manifest, the lock and the store say should be served now."""

    models: list[ModelInfo]
    waiting: dict[str, str]  # served name → why it cannot be served yet (not pinned / not verified / not fitting)
    pending: dict[str, str]  # served name → why its new pin is not served yet (the old revision serves)
    adapters: dict[str, list[AdapterInfo]] = dataclasses.field(default_factory=dict)  # base name → its adapters
    aliases: dict[str, AliasSpec] = dataclasses.field(default_factory=dict)  # alias name → its models, in order


def _unverified(name: str, repo: str, revision: str, commit: str | None, config: Config, corrupt: bool) -> str:
    if commit is not None and corrupt:
        return (f"model '{name}' ({repo}@{commit[:12]}) is marked corrupt in the store {config.store_path} (a file "
                "failed verification); `hubserve daemon` repairs it from upstream, or run `hubserve sync`")
    if commit is None:
        return (f"model '{name}' ({repo}@{revision}) is not pinned in {config.lock_path.name}; run `hubserve sync`")
    return (f"model '{name}' ({repo}@{commit[:12]}) is not verified in the store {config.store_path}; "
            "run `hubserve sync`")


def desired_models(
    config: Config, keep: dict[str, ModelInfo] | None = None, keep_adapters: dict[str, AdapterInfo] | None = None
) -> Desired:
    """Every model of the manifest whose pinned revision is verified in the store, and its adapters.

    A model (or adapter) whose new pin is not verified yet keeps its ``keep`` (currently served) revision: a
    revision reaches the server only once the store has it whole.
    """
    store = Store(config.store_path)
    lock = read_lock(config.lock_path)
    default = config.manifest.default_model()
    keep, keep_adapters = keep or {}, keep_adapters or {}
    out = Desired([], {}, {}, {}, {a.name: a for a in config.manifest.aliases})
    for spec in config.manifest.models:
        commit = pinned_commit(lock, spec.name, spec.repo, spec.revision)
        record = store.get_revision(spec.repo, commit) if commit else None
        corrupt = record is not None and is_corrupt(store, spec.repo, record.commit)
        if commit is None or record is None or corrupt:  # corrupt: no engine starts on it until it is repaired
            reason = _unverified(spec.name, spec.repo, spec.revision, commit, config, corrupt)
            current = keep.get(spec.name)
            if current is not None and current.repo == spec.repo:
                out.models.append(current)
                out.pending[spec.name] = reason
                out.adapters[spec.name] = _adapters(config, spec, current, store, lock, keep_adapters, out)
            else:
                out.waiting[spec.name] = reason
                out.waiting.update({a.name: f"adapter '{a.name}': its base model '{spec.name}' is not served yet"
                                    for a in spec.adapters})
            continue
        info = ModelInfo(
            name=spec.name,
            repo=spec.repo,
            commit=commit,
            task=spec.task or record.pipeline_tag or DEFAULT_TASK,
            snapshot=str(store.snapshot_dir(spec.repo, commit)),
            engine_args=dict(spec.engine),
            trust_remote_code=spec.trust_remote_code,
            default=default is not None and default.name == spec.name,
            weights_bytes=sum(f.size for f in record.files if f.path.endswith(WEIGHT_SUFFIXES)),
            backend=spec.backend,
            timeout_s=spec.timeout_s,
            on_demand=spec.load == "on-demand",
            idle_unload_s=spec.idle_unload_s,
            load_timeout_s=spec.load_timeout_s,
            cache=spec.cache,
            cache_ttl_s=spec.cache_ttl_s or DEFAULT_CACHE_TTL_S,
        )
        adapters = _adapters(config, spec, info, store, lock, keep_adapters, out)
        if spec.adapters and info.task in GENERATIVE_TASKS:
            info = dataclasses.replace(info, max_lora_rank=engine_lora_rank([a.rank for a in adapters]))
        out.models.append(info)
        out.adapters[spec.name] = adapters
    return out


def _adapters(
    config: Config, spec: ModelSpec, base: ModelInfo, store: Store, lock: Lock,
    keep: dict[str, AdapterInfo], out: Desired,
) -> list[AdapterInfo]:
    """The adapters of ``spec`` that can be served on ``base``; the others go to ``out.waiting``/``pending``."""
    served: list[AdapterInfo] = []
    for a in spec.adapters:
        try:
            served.append(_adapter(config, a, spec, base, store, lock))
        except ConfigError as e:
            current = keep.get(a.name)
            if current is not None and current.repo == a.repo and current.base == spec.name:
                served.append(current)
                out.pending[a.name] = str(e)
            else:
                out.waiting[a.name] = str(e)
    return served


def _adapter(config: Config, a: AdapterSpec, spec: ModelSpec, base: ModelInfo, store: Store, lock: Lock
             ) -> AdapterInfo:
    if base.task not in GENERATIVE_TASKS:
        raise ConfigError(f"adapter '{a.name}': its base model '{spec.name}' serves {base.task}; LoRA adapters are "
                          f"served on text-generation models")
    commit = pinned_commit(lock, a.name, a.repo, a.revision)
    record = store.get_revision(a.repo, commit) if commit else None
    corrupt = record is not None and is_corrupt(store, a.repo, record.commit)
    if commit is None or record is None or corrupt:
        raise ConfigError(_unverified(a.name, a.repo, a.revision, commit, config, corrupt).replace(
            "model '", "adapter '", 1))
    snapshot = str(store.snapshot_dir(a.repo, commit))
    rank = _check_cached(a.repo, commit, snapshot, base.snapshot, a.name, spec.name, spec.repo, base.commit)
    return AdapterInfo(name=a.name, repo=a.repo, commit=commit, snapshot=snapshot, base=spec.name, rank=rank)


@functools.lru_cache(maxsize=256)
def _check_cached(repo: str, commit: str, snapshot: str, base_snapshot: str, name: str, base_name: str,
                  base_repo: str, base_commit: str) -> int:
    """The adapter's rank once it fits its base (revisions are immutable: each pair is checked once)."""
    facts = check_adapter(in_folder(Path(snapshot)), in_folder(Path(base_snapshot)), f"'{name}' ({repo}@{commit[:12]})",
                          base_repo, f"'{base_name}' ({base_repo}@{base_commit[:12]})")
    return facts.rank


def resolve_models(config: Config) -> list[ModelInfo]:
    """The verified revision of every model of the manifest; ModelNotVerified names the first one missing."""
    desired = desired_models(config)
    missing = unserved_models(config, desired)
    if missing:
        raise ModelNotVerified(missing[0])
    return desired.models


def unserved_models(config: Config, desired: Desired) -> list[str]:
    """Why each model (not adapter) of the manifest cannot be served yet."""
    return [reason for name, reason in desired.waiting.items() if config.manifest.base_of(name) is None]

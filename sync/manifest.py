"""models.toml: what is served, pinned. Parsed once into pydantic models; unknown keys are errors."""

from __future__ import annotations

import contextlib
import os
import re
import time
import tomllib
from dataclasses import dataclass
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from sync.errors import ConfigError
from sync.paths import REPO_ID_RE, is_commit, is_pickle, printable

DEFAULT_ENDPOINT = "https://huggingface.co"
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._:/-]{0,127}\Z")  # \Z: "$" would let a trailing newline through
REVISION_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._/%-]{0,254}\Z")
TASKS = (
    "text-generation", "feature-extraction", "sentence-similarity", "text-classification",
    "token-classification", "fill-mask", "zero-shot-classification", "summarization", "translation",
    "text2text-generation", "question-answering", "text-ranking", "image-text-to-text",
    # images, audio and tables (the transformers worker; Whisper ASR on vLLM)
    "image-classification", "zero-shot-image-classification", "object-detection", "image-segmentation",
    "image-to-text", "visual-question-answering", "document-question-answering", "automatic-speech-recognition",
    "audio-classification", "text-to-speech", "text-to-audio", "text-to-image", "image-to-image",
    "table-question-answering",
)
# Hub tasks hubserve does not serve, and why (the server's Hub routes answer the same reason as a 400).
UNSERVED_TASKS = {
    "tabular-classification": "tabular models are scikit-learn/joblib pickles, which run arbitrary code when "
    "loaded; hubserve loads only safetensors weights into transformers or diffusers",
    "tabular-regression": "tabular models are scikit-learn/joblib pickles, which run arbitrary code when loaded; "
    "hubserve loads only safetensors weights into transformers or diffusers",
    "audio-to-audio": "transformers and diffusers have no audio-to-audio pipeline (speech enhancement and source "
    "separation models are SpeechBrain/Asteroid checkpoints)",
}
BACKENDS = ("auto", "vllm", "transformers")
LOAD_POLICIES = ("startup", "on-demand")
DEFAULT_CACHE_TTL_S = 600.0  # a model's `cache_ttl_s` when it sets `cache = true` and no ttl
MAX_CACHE_TTL_S = 30 * 86400.0
# Why an alias moves on to its next model (server/ops/fallback.py says how each is recognised).
FALLBACK_REASONS = ("failed", "overloaded", "loading", "context_length")
# What a PEFT adapter repo needs (and its card); anything else in it (training state, pickles) is not fetched.
ADAPTER_FILES = ["adapter_config.json", "adapter_model.safetensors", "README.md"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class StoreConfig(_Strict):
    path: str = Field("store", description="Store directory, relative to the config file.")
    keep_revisions: int = Field(
        2, ge=1, le=100, description="Verified revisions kept per model (the pinned one and those before it)."
    )


class UpstreamConfig(_Strict):
    endpoint: str | None = Field(None, description="Hub endpoint; else $HF_ENDPOINT, else the public Hub.")
    token_env: str = Field("HF_TOKEN", description="Name of the environment variable holding the token.")
    max_workers: int = Field(8, ge=1, le=64, description="Concurrent file downloads.")
    retries: int = Field(6, ge=0, le=50, description="Attempts per request beyond the first.")

    @field_validator("endpoint")
    @classmethod
    def _endpoint(cls, v: str | None) -> str | None:
        if v is not None and not re.match(r"^https?://[^\s/]+", v):
            raise ValueError(f"{v!r} is not an http(s) URL")
        return v.rstrip("/") if v else v


class DaemonConfig(_Strict):
    interval: float | None = Field(None, gt=0, description="Seconds between reconciles (default: --interval, 300).")
    listen: str | None = Field(None, description="host:port of the daemon's listener (default: --listen).")
    webhook_secret_env: str | None = Field(
        None, description="Env var holding the Hub webhook secret; unset: POST /webhooks/hub answers 401."
    )
    backoff_max: float = Field(600.0, gt=0, description="Longest wait between retries after upstream failures (s).")
    server: str | None = Field(
        None, description="URL of a `hubserve serve` whose /health gives the commit served (a metric); optional."
    )
    prune: bool = Field(
        True, description="After a pin moves, remove that repo's revisions beyond [store] keep_revisions."
    )
    webhook_min_interval: float = Field(
        5.0, ge=0, le=3600,
        description="Seconds between two webhook reconciles; webhooks in between coalesce into one pending.",
    )
    verify_interval: float = Field(
        7 * 86400.0, ge=0,
        description='How often the daemon re-hashes the whole store: "7d", "12h", "30m", seconds; "0"/"off": never.',
    )
    verify_bandwidth: float = Field(
        50.0, gt=0, le=100_000, description="MB/s the re-hash may read, so serving keeps the disk's bandwidth."
    )

    @field_validator("verify_interval", mode="before")
    @classmethod
    def _duration(cls, v: object) -> object:
        return parse_duration(v)


_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_duration(v: object) -> object:
    """``"7d"``, ``"12h"``, ``"30m"``, ``"90s"``, ``"1w"`` or a number of seconds; ``"off"``/``"0"`` -> 0."""
    if isinstance(v, bool):
        raise ValueError(f"{v!r} is not a duration: a number with s, m, h, d or w (\"7d\"), or \"off\"")
    if not isinstance(v, str):
        return v
    text = v.strip().lower()
    if text in ("off", "never", "0"):
        return 0.0
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*([smhdw]?)", text)
    if not m:
        raise ValueError(f"{v!r} is not a duration: a number with s, m, h, d or w (\"7d\"), or \"off\"")
    return float(m.group(1)) * _UNITS[m.group(2) or "s"]


class AdapterSpec(_Strict):
    """A LoRA adapter of a model, pinned like a model: ``[[models.adapters]]``."""

    name: str = Field(description="Served name: the OpenAI `model`, TGI `adapter_id`.")
    repo: str = Field(description="Hub repo id of a PEFT LoRA adapter (adapter_config.json + safetensors).")
    revision: str = Field("main", description="40-hex commit, or a branch/tag resolved once into models.lock.")
    follow: bool = Field(False, description="The daemon re-resolves the branch/tag and moves the pin when it moves.")
    include: list[str] | None = Field(None, description="Glob patterns of files to fetch (default: the adapter's).")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of files to skip.")

    _name = field_validator("name")(lambda cls, v: _check_name(v))
    _repo = field_validator("repo")(lambda cls, v: _check_repo(v))
    _revision = field_validator("revision")(lambda cls, v: _check_revision(v))

    def as_model(self, base: ModelSpec) -> ModelSpec:
        """The adapter as sync sees it: one more pinned repo (its files, its lock entry, its revisions)."""
        return ModelSpec.model_validate({
            "name": self.name, "repo": self.repo, "revision": self.revision, "follow": self.follow, "task": base.task,
            "include": self.include if self.include is not None else list(ADAPTER_FILES), "exclude": self.exclude,
        })


def _check_name(v: str) -> str:
    if not NAME_RE.match(v):
        raise ValueError(f"{v!r} is not a valid served name (letters, digits, '._:/-', max 128)")
    return v


def _check_repo(v: str) -> str:
    if not REPO_ID_RE.match(v) or ".." in v or "--" in v:
        raise ValueError(f"{v!r} is not a repo id of the form 'org/name'")
    return v


def _check_revision(v: str) -> str:
    if not REVISION_RE.match(v) or ".." in v:
        raise ValueError(f"{v!r} is not a 40-hex commit, branch or tag")
    return v


class ModelSpec(_Strict):
    name: str = Field(description="Served name: the OpenAI `model`, an alias on Hub routes.")
    repo: str = Field(description="Hub repo id, org/name.")
    revision: str = Field("main", description="40-hex commit, or a branch/tag resolved once into models.lock.")
    task: str | None = Field(
        None, description="Hub pipeline tag served for this model; default: the repo's pipeline_tag recorded at sync."
    )
    backend: str = Field("auto", description="auto (vLLM when it supports the architecture), vllm, transformers.")
    include: list[str] | None = Field(None, description="Glob patterns of files to fetch (default: all).")
    exclude: list[str] = Field(default_factory=list, description="Glob patterns of files to skip.")
    allow_pickle: bool = Field(False, description="Allow pickle weights (.bin .pt .pth .ckpt .pkl).")
    trust_remote_code: bool = Field(False, description="Let the engine run code shipped in the repo.")
    default: bool = Field(False, description="Serve this model on routes that name no model (TGI, /).")
    follow: bool = Field(False, description="The daemon re-resolves the branch/tag and moves the pin when it moves.")
    engine: dict[str, Any] = Field(default_factory=dict, description="Engine arguments (vLLM), passed through.")
    timeout_s: float | None = Field(
        None, gt=0, le=86400,
        description="Longest one request may take (then 504); default by task kind: embeddings and "
        "classification 60 s, generation HUBSERVE_REQUEST_TIMEOUT_S, images and audio 900 s.",
    )
    load: str = Field("startup", description="startup (loaded when the server starts) or on-demand "
                      "(loaded by its first request; unloaded first when memory or HUBSERVE_MAX_LOADED_MODELS "
                      "runs short).")
    idle_unload_s: float = Field(0, ge=0, description="Unload the model after this many idle seconds (0: never).")
    load_timeout_s: float | None = Field(
        None, gt=0, description="Longest a request waits for the model to load (default HUBSERVE_LOAD_TIMEOUT_S)."
    )
    adapters: list[AdapterSpec] = Field(default_factory=list, description="LoRA adapters served on this model.")
    cache: bool = Field(False, description="Cache deterministic answers (temperature 0 or a seed; embeddings, "
                        "classification and other non-generative tasks), keyed on the serving commit.")
    cache_ttl_s: float | None = Field(
        None, gt=0, le=MAX_CACHE_TTL_S,
        description=f"How long a cached answer is kept (default {DEFAULT_CACHE_TTL_S:g} s; needs cache = true).",
    )

    _name = field_validator("name")(lambda cls, v: _check_name(v))
    _repo = field_validator("repo")(lambda cls, v: _check_repo(v))
    _revision = field_validator("revision")(lambda cls, v: _check_revision(v))

    @model_validator(mode="after")
    def _cache_ttl_needs_cache(self) -> ModelSpec:
        if self.cache_ttl_s is not None and not self.cache:
            raise ValueError("cache_ttl_s is set but cache is not: add cache = true (or remove cache_ttl_s)")
        return self

    @field_validator("load")
    @classmethod
    def _load(cls, v: str) -> str:
        if v not in LOAD_POLICIES:
            raise ValueError(f"{v!r} is not a load policy; accepted: {', '.join(LOAD_POLICIES)}")
        return v

    @field_validator("task")
    @classmethod
    def _task(cls, v: str | None) -> str | None:
        if v in UNSERVED_TASKS:
            raise ValueError(f"{v!r} is not served: {UNSERVED_TASKS[v]}")
        if v is not None and v not in TASKS:
            raise ValueError(f"{v!r} is not a supported task; accepted: {', '.join(TASKS)}")
        return v

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        if v not in BACKENDS:
            raise ValueError(f"{v!r} is not a backend; accepted: {', '.join(BACKENDS)}")
        return v

    @model_validator(mode="after")
    def _follow_needs_ref(self) -> ModelSpec:
        specs: list[ModelSpec | AdapterSpec] = [self, *self.adapters]
        for spec in specs:
            if spec.follow and is_commit(spec.revision):
                raise ValueError(f"follow = true needs a branch or tag to follow, not the commit {spec.revision!r}")
        if self.adapters and self.backend == "transformers":
            raise ValueError("LoRA adapters are served on vLLM; a model with adapters cannot use backend = "
                             "\"transformers\"")
        return self

    def wants(self, path: str) -> bool:
        """Whether include/exclude select ``path`` (pickle refusal is checked separately)."""
        if self.include is not None and not any(_match(path, p) for p in self.include):
            return False
        return not any(_match(path, p) for p in self.exclude)

    def selection_key(self) -> str:
        """The settings that decide which files of a commit are fetched, as one stable string."""
        include = "*" if self.include is None else ",".join(self.include)
        return f"include={include};exclude={','.join(self.exclude)};allow_pickle={str(self.allow_pickle).lower()}"

    def refuses_pickle(self, path: str) -> bool:
        return is_pickle(path) and not self.allow_pickle


class AliasSpec(_Strict):
    """A name clients ask for that is answered by the first of its models that can: ``[[aliases]]``."""

    name: str = Field(description="What clients ask for: OpenAI/Anthropic `model`, Hub `/models/{name}`.")
    models: list[str] = Field(min_length=1, description="Served names of models (or adapters), tried in order.")
    fallback_on: list[str] = Field(
        default_factory=lambda: list(FALLBACK_REASONS),
        description="Why the next model is tried: failed, overloaded, loading, context_length (default: all four).",
    )

    _name = field_validator("name")(lambda cls, v: _check_name(v))

    @field_validator("models")
    @classmethod
    def _models(cls, v: list[str]) -> list[str]:
        for name in v:
            _check_name(name)
        dupes = sorted({n for n in v if v.count(n) > 1})
        if dupes:
            raise ValueError(f"a model is listed twice: {', '.join(dupes)}")
        return v

    @field_validator("fallback_on")
    @classmethod
    def _fallback_on(cls, v: list[str]) -> list[str]:
        for reason in v:
            if reason not in FALLBACK_REASONS:
                raise ValueError(f"{reason!r} is not a fallback reason; accepted: {', '.join(FALLBACK_REASONS)}")
        return list(dict.fromkeys(v))


def _match(path: str, pattern: str) -> bool:
    # A pattern without '/' matches the file name at any depth as well as the whole path.
    return fnmatch(path, pattern) or ("/" not in pattern and fnmatch(path.rsplit("/", 1)[-1], pattern))


class Manifest(_Strict):
    store: StoreConfig = Field(default_factory=StoreConfig)  # type: ignore[arg-type]
    upstream: UpstreamConfig = Field(default_factory=UpstreamConfig)  # type: ignore[arg-type]
    daemon: DaemonConfig = Field(default_factory=DaemonConfig)  # type: ignore[arg-type]
    models: list[ModelSpec] = Field(default_factory=list)
    aliases: list[AliasSpec] = Field(default_factory=list)

    @model_validator(mode="after")
    def _unique(self) -> Manifest:
        names = self.names()
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"duplicate model names (models and adapters share one namespace): {', '.join(dupes)}")
        defaults = [m.name for m in self.models if m.default]
        if len(defaults) > 1:
            raise ValueError(f"more than one model has default = true: {', '.join(defaults)}")
        self._check_aliases()
        return self

    def _check_aliases(self) -> None:
        """Alias names are their own: no model's or adapter's name or repo; their models are this manifest's."""
        names = self.names()
        taken = set(names) | {m.repo for m in self.pinned}
        seen: set[str] = set()
        for i, alias in enumerate(self.aliases):
            where = f"aliases[{i}] ({alias.name})"
            if alias.name in seen:
                raise ValueError(f"{where}.name: another alias has the name {alias.name!r}")
            if alias.name in taken:
                raise ValueError(f"{where}.name: {alias.name!r} is already a model's name or repo id")
            seen.add(alias.name)
            unknown = [m for m in alias.models if m not in names]
            if unknown:
                raise ValueError(f"{where}.models: {', '.join(map(repr, unknown))} is not a model of this manifest; "
                                 f"known: {', '.join(names) or 'none'}")

    @property
    def pinned(self) -> list[ModelSpec]:
        """Every pinned repo, as sync treats it: each model, then each of its adapters (as a ModelSpec)."""
        out: list[ModelSpec] = []
        for m in self.models:
            out += [m, *(a.as_model(m) for a in m.adapters)]
        return out

    def base_of(self, name: str) -> ModelSpec | None:
        """The model an adapter named ``name`` belongs to (None: ``name`` is no adapter)."""
        return next((m for m in self.models if any(a.name == name for a in m.adapters)), None)

    def model(self, name: str) -> ModelSpec:
        """A model or an adapter (as sync sees it) by its served name."""
        for m in self.pinned:
            if m.name == name:
                return m
        raise ConfigError(f"no model named {name!r} in the manifest; known: {', '.join(self.names()) or 'none'}")

    def names(self) -> list[str]:
        """Served names of every model and adapter."""
        return [m.name for m in self.pinned]

    def default_model(self) -> ModelSpec | None:
        for m in self.models:
            if m.default:
                return m
        return self.models[0] if len(self.models) == 1 else None


@dataclass(frozen=True)
class Config:
    """A parsed manifest plus where it came from and what the environment overrides."""

    path: Path
    manifest: Manifest
    store_path: Path
    endpoint: str

    @property
    def lock_path(self) -> Path:
        return self.path.with_suffix(".lock")

    @property
    def token(self) -> str | None:
        return os.environ.get(self.manifest.upstream.token_env) or None


def _loc(manifest_data: dict[str, Any], loc: tuple[Any, ...]) -> str:
    parts: list[str] = []
    for i, key in enumerate(loc):
        if isinstance(key, int):
            label = f"[{key}]"
            if loc[:i] in (("models",), ("aliases",)):
                with contextlib.suppress(KeyError, IndexError, TypeError):
                    label += f" ({printable(manifest_data[loc[0]][key]['name'], 128)})"  # a name may hold anything
            parts.append(label)
        else:
            parts.append(("." if parts else "") + str(key))
    return "".join(parts)


def parse_manifest(text: str, source: str = "models.toml") -> Manifest:
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from e
    except RecursionError:
        raise ConfigError(f"{source}: not valid TOML: nested too deeply") from None
    try:
        return Manifest.model_validate(data)
    except ValidationError as e:
        lines = []
        for err in e.errors():
            where = _loc(data, tuple(err["loc"]))
            msg = err["msg"].removeprefix("Value error, ")
            if err["type"] == "extra_forbidden":
                msg = f"unknown key {err['loc'][-1]!r}"
            bad = "" if err["type"] in ("extra_forbidden", "missing") else f" (got {err.get('input')!r})"
            if not where and msg.startswith("aliases["):  # the cross-checks of [[aliases]] name their own place
                where, msg, bad = msg.split(": ", 1)[0], msg.split(": ", 1)[1], ""
            lines.append(f"{source}: {where or 'top level'}: {msg}{bad}")
        raise ConfigError("; ".join(lines)) from e


SETTLE_S = 0.25  # a models.toml changed more recently than this may be half-written: read it once it is this old
SETTLE_MAX_S = 2.0  # ... but never wait longer (an mtime from a skewed clock on a network volume)


def unsettled_s(path: Path, now: float | None = None) -> float:
    """How long to wait before reading a changed ``path`` (0: now). An editor or script that truncates a
    models.toml and then writes it leaves it empty, or a prefix that parses with fewer models, for a moment:
    reloads (server and daemon) read it only once it has been unchanged for SETTLE_S."""
    try:
        age = (time.time() if now is None else now) - path.stat().st_mtime
    except OSError:
        return 0.0  # missing: the reader says so
    return SETTLE_S - age if 0 <= age < SETTLE_S else 0.0


def emptied(path: Path, serving: bool) -> ConfigError | None:
    """A models.toml of 0 bytes while models are configured is being written, not meant: the error that keeps the
    last good configuration (to serve no models, leave a comment in it)."""
    try:
        empty = path.stat().st_size == 0
    except OSError:
        return None
    if not (empty and serving):
        return None
    return ConfigError(f"{path.name} is empty (being written?). To serve no models, leave a comment in it.")


def find_config(config: Path | None) -> Path:
    """--config, else $HUBSERVE_CONFIG, else ./models.toml."""
    path = config or (Path(os.environ["HUBSERVE_CONFIG"]) if os.environ.get("HUBSERVE_CONFIG") else None)
    path = path or Path("models.toml")
    if not path.is_file():
        raise ConfigError(f"config file {path} not found; pass --config PATH or set HUBSERVE_CONFIG")
    return path.absolute()


def load_config(config: Path | None = None, store: Path | None = None) -> Config:
    """Read the manifest and apply the precedence rules for the store and the upstream."""
    path = find_config(config)
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    manifest = parse_manifest(text, str(path))
    return Config(
        path=path,
        manifest=manifest,
        store_path=resolve_store_path(store, manifest, path),
        endpoint=(manifest.upstream.endpoint or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
    )


def resolve_store_path(store: Path | None, manifest: Manifest | None, config_path: Path | None) -> Path:
    """--store, else $HUBSERVE_STORE, else ``[store] path`` relative to the config file."""
    if store is not None:
        return store.absolute()
    if os.environ.get("HUBSERVE_STORE"):
        return Path(os.environ["HUBSERVE_STORE"]).absolute()
    if manifest is not None and config_path is not None:
        return (config_path.parent / manifest.store.path).absolute()
    return Path("store").absolute()

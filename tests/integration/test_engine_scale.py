"""A model across GPUs/nodes: parallelism flags and RAY_ADDRESS reach vLLM; stopping (or a crash) ends every
process the engine started, and never a Ray cluster it did not start. The engine is tests/fixtures/fake_vllm.py
(vLLM's command line, a multi-process shape), since a multi-GPU vLLM cannot run here."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest

from server.engines.base import EngineState, ModelInfo
from server.engines.vllm import GIB, VLLMEngine, cpu_binding
from server.settings import Device, Settings

pytestmark = pytest.mark.integration
FAKE = Path(__file__).resolve().parents[1] / "fixtures" / "fake_vllm.py"
COMMIT = "c" * 40
PARALLEL = {"tensor_parallel_size": 2, "pipeline_parallel_size": 2, "distributed_executor_backend": "ray"}


class FakeVLLMEngine(VLLMEngine):
    """The real engine supervision, launching the fake with exactly the arguments vLLM would get."""

    def command(self) -> list[str]:
        real = super().command()
        assert real[1:3] == ["-m", "vllm.entrypoints.openai.api_server"]
        return [sys.executable, str(FAKE), *real[3:]]


def _info(tmp_path: Path, args: dict[str, object]) -> ModelInfo:
    snapshot = tmp_path / "store" / "models--org--big" / "snapshots" / COMMIT
    snapshot.mkdir(parents=True)
    return ModelInfo("big", "org/big", COMMIT, "text-generation", str(snapshot), dict(args), weights_bytes=10 * GIB)


def _settings() -> Settings:
    return Settings(device=Device.GPU, engine_start_timeout_s=60, engine_stop_timeout_s=3, engine_start_attempts=1,
                    engine_env=frozenset({"FAKE_VLLM_REPORT"}))  # engines inherit an allow-list: name the report path


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


async def _until(check: object, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < deadline, "timed out"
        await asyncio.sleep(0.1)


@pytest.fixture
def ray_cluster(monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[bytes]]:
    """A process standing for a Ray cluster the gateway joins (not started by the engine)."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"], start_new_session=True)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    yield proc
    proc.kill()
    proc.wait()


def test_parallel_flags_memory_and_ray_address_reach_the_engine(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.5:6379")
    engine = VLLMEngine(_info(tmp_path, PARALLEL), _settings())
    cmd = engine.command()
    tail = cmd[cmd.index("--disable-uvicorn-access-log") + 1 :]
    assert tail == [
        "--tensor-parallel-size", "2", "--pipeline-parallel-size", "2", "--distributed-executor-backend", "ray",
    ]  # fmt: skip
    assert engine.environment()["RAY_ADDRESS"] == "10.0.0.5:6379"
    single = VLLMEngine(_info(tmp_path / "one", {}), _settings())
    # four workers (one per GPU), each with its own runtime; the weights are counted once
    assert engine.memory_estimate() - single.memory_estimate() == 3 * int(1.5 * GIB)


def test_cpu_workers_get_their_own_cores(tmp_path: Path) -> None:
    assert cpu_binding([0, 1, 2, 3, 4], 2) == "0,1|2,3"
    assert cpu_binding([0], 2) == "0|0"
    cpu = VLLMEngine(_info(tmp_path, {"tensor_parallel_size": 2}), Settings(device=Device.CPU))
    assert cpu.environment()["VLLM_CPU_OMP_THREADS_BIND"].count("|") == 1
    single = VLLMEngine(_info(tmp_path / "1", {}), Settings(device=Device.CPU))
    assert "VLLM_CPU_OMP_THREADS_BIND" not in single.environment()  # alone: vLLM's own binding
    single.shares_cores = True  # beside another engine (several models, a blue/green swap): no pinning
    assert single.environment()["VLLM_CPU_OMP_THREADS_BIND"] == "nobind"


async def test_stop_ends_every_engine_process_but_not_the_ray_cluster(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, ray_cluster: subprocess.Popen[bytes]
) -> None:
    monkeypatch.setenv("FAKE_VLLM_REPORT", str(tmp_path / "report.json"))
    engine = FakeVLLMEngine(_info(tmp_path, PARALLEL), _settings())
    await engine.start()
    try:
        assert engine.state is EngineState.READY and engine.max_model_len == 512
        report = json.loads((tmp_path / "report.json").read_text())
        assert report["ray_address"] == "10.0.0.5:6379"
        assert "--distributed-executor-backend" in report["argv"]
        pids = [report["main"], *report["workers"], *report["detached"]]
        assert not any(_gone(p) for p in pids)
    finally:
        await engine.stop()
    await _until(lambda: all(_gone(p) for p in pids), timeout=10)
    assert ray_cluster.poll() is None, "the engine stopped a Ray cluster it did not start"


async def test_crash_then_restart_leaves_no_orphan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    report_path = tmp_path / "report.json"
    monkeypatch.setenv("FAKE_VLLM_REPORT", str(report_path))
    engine = FakeVLLMEngine(_info(tmp_path, PARALLEL), _settings())
    await engine.start()
    try:
        first = json.loads(report_path.read_text())
        report_path.unlink()
        os.kill(first["main"], signal.SIGKILL)  # the engine's main process dies alone
        await _until(report_path.exists)
        await _until(lambda: engine.state is EngineState.READY and engine.pid != first["main"])
        assert engine.restarts == 1
        alive = [p for p in [first["main"], *first["workers"], *first["detached"]] if not _gone(p)]
        assert not alive, (first, [psutil.Process(p).cmdline() for p in alive])
        second = json.loads(report_path.read_text())
    finally:
        await engine.stop()
    await _until(lambda: all(_gone(p) for p in [second["main"], *second["workers"], *second["detached"]]))


async def test_lower_priority_renices_every_engine_process_and_thread(tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """What a blue/green swap on CPU does to the old engine while the new one starts (registry.py)."""
    monkeypatch.setenv("FAKE_VLLM_REPORT", str(tmp_path / "report.json"))
    engine = FakeVLLMEngine(_info(tmp_path, {}), _settings())
    await engine.start()
    try:
        report = json.loads((tmp_path / "report.json").read_text())
        group = [report["main"], *report["workers"]]
        tids = [t.id for p in group for t in psutil.Process(p).threads()]
        before = {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids}
        detached = os.getpriority(os.PRIO_PROCESS, report["detached"][0])
        assert engine.lower_priority(10) == before[report["main"]]
        assert {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids} == {t: min(19, n + 10)
                                                                             for t, n in before.items()}
        assert os.getpriority(os.PRIO_PROCESS, report["detached"][0]) == detached  # not in its process group
        engine.restore_priority(before[report["main"]])  # root here; elsewhere it may stay nicer (logged)
        assert {tid: os.getpriority(os.PRIO_PROCESS, tid) for tid in tids} == before
        assert engine.lower_priority(0) is None
    finally:
        await engine.stop()

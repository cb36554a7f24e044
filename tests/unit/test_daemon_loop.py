"""The daemon's loop without processes: a fake host (clock, signals), a fake local executor (scripted
workers) and fake sensors around the real Daemon, LocalExecutor stop/escalate logic and a real SQLite
store. Admission, holds by code, guard kills, timeouts, warm and cold shutdown, classify()."""
from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

from jobs.contract import protocol
from lab_attendant.config import parse_config
from lab_attendant.daemon.loop import HOLD_PAGING_OFF, Daemon
from lab_attendant.executors.exits import WorkerExit, classify
from lab_attendant.guards.host import GpuReading
from lab_attendant.store.states import RunState
from tests.unit.fakes import (
    EXIT_TERMINATED,
    FakeHost,
    FakeLocalExecutor,
    run_state,
    submit,
)


def test_admits_a_run_writes_its_typed_spec_and_ends_succeeded(loop):
    d, launcher, _ = loop()
    rid = submit(d, "nightly_insights", archive="/a", batch_size=4)
    d.tick()
    assert run_state(d, rid)[0] is RunState.STARTING
    spec = launcher.specs[0]
    assert (spec.run_id, spec.kind, spec.module, spec.params) == (
        rid, "nightly_insights", "jobs.kinds.nightly_insights", {"archive": "/a", "batch_size": 4})
    assert spec.model is not None and spec.model.name == "gemma-3-270m"
    launcher.emit(rid, protocol.STARTED, t=1.0)
    launcher.emit(rid, protocol.PROGRESS, done=2, total=5, unit="notes")
    d.tick()
    run = d.store.get(rid)
    assert run.state is RunState.RUNNING and (run.progress_done, run.progress_total) == (2, 5)
    launcher.finish(rid, protocol.EXIT_OK, result="/out/insights.json")
    d.tick()
    assert run_state(d, rid) == (RunState.SUCCEEDED, "result written to /out/insights.json")
    assert not d.workers and d.should_exit() is False


def test_paging_runs_are_held_by_code_and_released_when_the_hold_lifts(loop):
    d, launcher, _ = loop(paging=False)
    paging_run, plain_run = submit(d, "nightly_insights", archive="/a"), submit(d, "probe")
    d.tick()
    run = d.store.get(paging_run)
    assert (run.state, run.hold_code, run.reason) == (RunState.HELD, "paging_off",
                                                      HOLD_PAGING_OFF.reason)
    assert run_state(d, plain_run)[0] is RunState.STARTING        # plain kinds are not held
    n_events = len(d.store.events(paging_run))
    d.tick()
    d.tick()
    assert len(d.store.events(paging_run)) == n_events         # same code: not re-held each tick
    d.experimental_paging = True
    launcher.finish(plain_run, protocol.EXIT_OK, result="/r")
    d.tick()
    states = [e.to_state for e in d.store.events(paging_run)]
    assert states[-2:] == ["queued", "starting"] and d.store.get(paging_run).hold_code is None


def test_thermal_guard_kills_the_paging_worker_and_holds_the_next(loop):
    d, launcher, sensors = loop()
    sensors.gpus = [GpuReading(index=0, temperature_c=60)]
    first = submit(d, "nightly_insights", archive="/a")
    d.tick()
    launcher.emit(first, protocol.STARTED)
    sensors.gpus = [GpuReading(index=0, temperature_c=91)]
    d.host.advance(1.0)
    d.tick()                                                   # guard: SIGTERM to the group
    assert (launcher.procs[first].pid, signal.SIGTERM) in d.host.signals
    second = submit(d, "nightly_insights", archive="/b")
    d.tick()                                                   # reaped; the new run is held
    state, reason = run_state(d, first)
    assert state is RunState.KILLED_THERMAL and "91 °C > 85 °C limit" in reason
    run = d.store.get(second)
    assert (run.state, run.hold_code) == (RunState.HELD, "thermal")
    assert [g.action for g in d.store.guard_events()] == ["kill", "hold"]
    sensors.gpus = [GpuReading(index=0, temperature_c=70)]
    d.host.advance(1.0)
    d.tick()
    assert d.store.get(second).state is RunState.STARTING


def test_a_gpu_lost_mid_run_holds_and_stops_paging_and_the_daemon_recovers_with_nvml(tmp_path: Path):
    from lab_attendant.guards.host import NvmlSensors
    from tests.unit.fakes import FakeNvml
    cfg = parse_config({"paths": {"state_dir": "var"}, "worker": {"python": sys.executable},
                        "guards": {"min_available_ram_bytes": 0, "sensors_lost_grace_s": 10.0}},
                       base_dir=tmp_path, source=None)
    host, nv = FakeHost(), FakeNvml()
    launcher = FakeLocalExecutor(host=host)
    d = Daemon(cfg, experimental_paging=True, host=host, local_executor=launcher,
               sensors=NvmlSensors(nv, clock=host.monotonic))
    d.open()
    try:
        first = submit(d, "nightly_insights", archive="/a")
        d.tick()
        nv.lost = True                                    # Xid 79: the GPU fell off the bus
        second = submit(d, "nightly_insights", archive="/b")
        host.advance(1.0)
        d.tick()
        run = d.store.get(second)
        assert (run.state, run.hold_code) == (RunState.HELD, "sensors")
        assert "NVMLError_GpuIsLost" in run.reason
        assert d.store.get(first).state is RunState.STARTING   # not stopped within the grace
        host.advance(10.0)
        d.tick()
        d.tick()
        state, reason = run_state(d, first)
        assert state is RunState.FAILED and "limit cannot be enforced; paging run stopped" in reason
        nv.lost = False
        host.advance(60.0)
        d.tick()
        assert d.store.get(second).state is RunState.STARTING  # NVML is back: the hold lifts
        assert [g.action for g in d.store.guard_events() if g.guard == "sensors"] == [
            "hold", "kill", "resume"]
    finally:
        d.close()


def test_timeout_sends_sigterm_then_sigkill_after_the_grace(loop):
    d, launcher, _ = loop()
    launcher.obeys_sigterm = False
    rid = submit(d, timeout_s=5.0)
    d.tick()
    pid = launcher.procs[rid].pid
    d.host.advance(5.0)
    d.tick()
    assert d.host.signals == [(pid, signal.SIGTERM)]
    d.host.advance(1.9)
    d.tick()
    assert signal.SIGKILL not in {s for _, s in d.host.signals}  # grace (2 s) not over yet
    d.host.advance(0.2)
    d.tick()                                                   # SIGKILL sent
    d.tick()                                                   # and reaped
    state, reason = run_state(d, rid)
    assert state is RunState.TIMED_OUT
    assert reason == "timed out after 5 s; worker exited by SIGKILL (SIGKILL after grace)"


def test_warm_shutdown_admits_nothing_and_lets_running_runs_finish(loop):
    d, launcher, _ = loop()
    running = submit(d)
    d.tick()
    d.on_signal(signal.SIGTERM)
    waiting = submit(d)
    d.tick()
    assert run_state(d, waiting)[0] is RunState.QUEUED and not d.should_exit()
    assert d.host.signals == []                                # the running run is left alone
    launcher.finish(running, protocol.EXIT_OK, result="/r")
    d.tick()
    assert run_state(d, running)[0] is RunState.SUCCEEDED and d.should_exit()
    assert run_state(d, waiting)[0] is RunState.QUEUED            # still there for the next daemon


def test_warm_shutdown_requeues_runs_still_going_when_its_grace_runs_out(loop):
    d, launcher, _ = loop()
    rid = submit(d)
    d.tick()
    d.on_signal(signal.SIGTERM)
    d.tick()
    d.host.advance(30.0)
    d.tick()
    d.tick()
    state, reason = run_state(d, rid)
    assert state is RunState.QUEUED and "shutdown grace of 30 s ran out" in reason
    assert d.store.get(rid).pid is None and d.should_exit()


def test_cold_shutdown_kills_at_once_and_requeues(loop):
    d, launcher, _ = loop()
    launcher.obeys_sigterm = False
    rid = submit(d)
    d.tick()
    d.on_signal(signal.SIGTERM)
    d.on_signal(signal.SIGINT)
    d.tick()
    pid = launcher.procs[rid].pid
    assert (pid, signal.SIGKILL) in d.host.signals             # no grace on a cold stop
    d.tick()
    state, reason = run_state(d, rid)
    assert state is RunState.QUEUED and "cold shutdown" in reason


def test_cancel_of_a_running_run_stops_its_group(loop):
    d, launcher, _ = loop()
    rid = submit(d)
    d.tick()
    d.store.request_cancel(rid)
    d.tick()
    d.tick()
    assert run_state(d, rid) == (RunState.CANCELLED,
                              f"cancelled by user; worker exited with code {EXIT_TERMINATED}")


def test_a_sigkill_from_outside_with_kernel_oom_evidence_ends_oom(loop):
    d, launcher, _ = loop()
    quiet, killed = submit(d), submit(d)
    d.tick()
    launcher.finish(quiet, -signal.SIGKILL)             # SIGKILL, no OOM kill on the host
    d.tick()
    assert run_state(d, quiet) == (RunState.FAILED, "worker exited by SIGKILL")
    d.host.oom_kills += 1                               # the kernel OOM killer strikes
    launcher.finish(killed, -signal.SIGKILL)
    d.tick()
    state, reason = run_state(d, killed)
    assert state is RunState.OOM
    assert reason == ("worker exited by SIGKILL; the kernel OOM killer killed 1 process(es) during "
                      "the run (/proc/vmstat oom_kill)")


def test_the_real_host_reads_the_kernel_oom_kill_count():
    from lab_attendant.guards.host import Host
    count = Host().oom_kill_count()
    assert count is None or (isinstance(count, int) and count >= 0)


def _err(fields: dict[str, Any]) -> protocol.WorkerError:
    """An error event as the daemon gets it: encoded by the worker, decoded by the contract."""
    ev = protocol.decode(protocol.encode(protocol.ERROR, **fields))
    assert isinstance(ev, protocol.WorkerError)
    return ev


@pytest.mark.parametrize("exit_info, state, needle", [
    (WorkerExit(0, result_path="/r/x.json"), RunState.SUCCEEDED, "result written to /r/x.json"),
    (WorkerExit(0), RunState.FAILED, "exited 0 without reporting a result"),
    (WorkerExit(protocol.EXIT_OOM, error=_err({"type": "OutOfMemoryError", "message": "CUDA",
                                          "oom_kind": "cuda", "requested_bytes": 2 * 1024**3,
                                          "free_bytes": 1024**3, "total_bytes": 11 * 1024**3,
                                          "reserved_bytes": 9 * 1024**3})),
     RunState.OOM, "out of GPU memory: requested 2.0 GiB with 1.0 GiB free of 11.0 GiB (9.0 GiB "
                   "reserved by torch); OutOfMemoryError: CUDA"),
    (WorkerExit(protocol.EXIT_OOM, error=_err({"type": "RuntimeError", "oom_kind": "pinned_host",
                                          "message": "CUDA error: out of memory (cudaHostAlloc)"})),
     RunState.OOM, "out of pinned host memory: RuntimeError: CUDA error: out of memory"),
    (WorkerExit(protocol.EXIT_BAD_SPEC, error=_err({"type": "SpecError", "message": "key 'x' is missing"})),
     RunState.FAILED, "worker refused its spec: SpecError: key 'x' is missing"),
    (WorkerExit(-signal.SIGKILL, near_memory_limit=True, rss_bytes=int(23.1 * 1024**3)),
     RunState.OOM, "worker exited by SIGKILL at 23.1 GiB RSS; likely killed by the kernel OOM killer"),
    (WorkerExit(-signal.SIGKILL, rss_bytes=1024**3, kernel_oom_kills=2), RunState.OOM,
     "worker exited by SIGKILL at 1.0 GiB RSS; the kernel OOM killer killed 2 process(es)"),
    (WorkerExit(-signal.SIGKILL), RunState.FAILED, "worker exited by SIGKILL"),
    (WorkerExit(1, error=_err({"type": "ValueError", "message": "bad"})), RunState.FAILED,
     "ValueError: bad (exited with code 1)"),
    (WorkerExit(-signal.SIGKILL, RunState.KILLED_THERMAL, "killed: GPU at 91 °C", forced=True),
     RunState.KILLED_THERMAL, "killed: GPU at 91 °C; worker exited by SIGKILL (SIGKILL after grace)"),
])
def test_classify_maps_exit_information_to_a_state_and_a_sentence(exit_info, state, needle):
    got_state, reason = classify(exit_info)
    assert got_state is state and needle in reason

"""The daemon's main loop: reap -> read worker events -> handle signals -> enforce -> admit.

Signal handlers only set flags; the loop does the work (supervisord's runforever). Runs found
active at start-up belonged to a dead daemon: their groups are killed and they end `lost`, except
Slurm runs, which are re-attached by job id (a stopping daemon detaches from them).
"""
from __future__ import annotations

import os
import signal
import socket
from pathlib import Path
from typing import Any

from jobs.contract.kinds import Kind, registry
from lab_attendant.config import Config
from lab_attendant.daemon.events import WorkerEvents
from lab_attendant.daemon.outcomes import Outcomes
from lab_attendant.daemon.reconcile import reconcile
from lab_attendant.daemon.retention import Retention
from lab_attendant.daemon.runspec import build_spec
from lab_attendant.daemon.wakeup import Wakeup
from lab_attendant.errors import ConfigError, StoreUnavailable
from lab_attendant.executors.base import RunHandle
from lab_attendant.executors.exits import WorkerExit, classify
from lab_attendant.executors.factory import ExecutorFactory
from lab_attendant.executors.local import LocalExecutor
from lab_attendant.executors.workerfence import SANDBOX_META, WorkerFence, move_legacy_worker_state
from lab_attendant.guards.cotenants import CotenantAction, Cotenants
from lab_attendant.guards.host import Host, make_sensors, signal_name
from lab_attendant.guards.policy import Action, GuardAction, Guards, WorkerInfo
from lab_attendant.scheduler import Schedules
from lab_attendant.service.lock import DaemonLock
from lab_attendant.service.logsetup import RunOutput, get_logger, log_for
from lab_attendant.service.sdnotify import Notifier, status_text
from lab_attendant.store import samples
from lab_attendant.store.backup import AutoBackup
from lab_attendant.store.db import Store
from lab_attendant.store.deps import USER_HOLD, cancel_unsatisfiable
from lab_attendant.store.faults import StatusFile, WriteBehind
from lab_attendant.store.queue import controls
from lab_attendant.store.retry import ensure_retries
from lab_attendant.store.states import ACTIVE, WAITING, Hold, RunState

HOLD_PAGING_OFF = Hold("paging_off", "experimental paging is off; start the daemon with "
                       "--experimental-paging to run this kind")
HEARTBEAT_EVERY_S = 2.0


log = get_logger("lab_attendant.daemon.loop")


class Daemon:
    def __init__(self, cfg: Config, *, experimental_paging: bool = False, burst: bool = False,
                 host: Host | None = None, local_executor: LocalExecutor | None = None,
                 sensors: Any = None) -> None:
        self.cfg = cfg
        self.experimental_paging = experimental_paging   # in memory only, never persisted
        self.burst = burst
        self.host = host or Host()
        self.executors = ExecutorFactory(   # local, or Slurm (whose re-attach offsets it saves)
            cfg, self.host,
            local_executor or LocalExecutor(self.host, kill_grace_s=cfg.limits.kill_grace_s,
                                            fence=WorkerFence.for_config(cfg)),
            save_meta=lambda key, value: self.writes.may(self.store.set_meta, key, value))
        self.kinds: dict[str, Kind] = registry(cfg.worker.extra_kinds)
        self.schedules = Schedules(cfg, self.kinds)      # not started in --burst mode
        # Opened by open(): the loop runs only between open() and close().
        self.store: Store
        self.writes: WriteBehind                        # every daemon write goes through it
        self._opened = False
        self.status_file = StatusFile(cfg.paths.state_dir / "daemon-status.json")
        self.auto_backup: AutoBackup
        self.guards = Guards(cfg.guards, self.host, sensors or make_sensors(cfg.guards.sensors))
        self.cotenants: Cotenants                       # set by open() once reconciled
        self.sampler = samples.Sampler(self.host)        # per-run sensor history
        self.outcomes = Outcomes(cfg, lambda: self.store.read(), self.host)  # log, notify, metrics
        self._last_guard = float("-inf")
        self.workers: dict[int, RunHandle] = {}
        self.outputs: dict[int, RunOutput] = {}
        self._stopping_since: float | None = None       # warm shutdown started (monotonic)
        self._cold = False
        self._daemon_id = 0
        self._last_heartbeat = 0.0
        self.wakeup = Wakeup()                          # signals as flags; the loop's select()
        self.notifier = Notifier.from_env()             # systemd Type=notify; no-op outside it

    # -- lifecycle ------------------------------------------------------------------------------
    def run(self) -> int:
        lock = DaemonLock(self.cfg.paths.state_dir)
        lock.acquire()
        try:
            self.wakeup.install(self.on_signal)
            self.open()
            if not self.burst:
                self.schedules.start()
            self.notifier.ready(self._sd_status())
            while True:
                self.tick()
                if self.should_exit():
                    break
                self._wait()
            log.info("daemon stopped", pid=os.getpid())
            return 0
        finally:
            self.notifier.stopping()
            self.schedules.shutdown()
            self.close()
            lock.release()

    def open(self) -> None:
        """Open the store, reconcile what a dead daemon left, restore co-tenants, register."""
        self.store = Store(self.cfg.db_path)
        self._opened = True
        self.writes = WriteBehind(self.store, self.host.monotonic, self._on_store_fault)
        self.events = WorkerEvents(self.store, self.writes, self.sampler)
        self.status_file.open()
        self.auto_backup = AutoBackup(self.cfg.db_path, self.cfg.backups_dir,
                                      keep=self.cfg.backups.keep,
                                      interval_s=self.cfg.backups.interval_s)
        self.retention = Retention(self.cfg, self.store)
        self._fence_workers()
        self.reconcile()
        self.cotenants = Cotenants(self.cfg.cotenants, self.host, self._cotenant_event,
                                   lambda *a: self.writes.must(self.store.set_cotenant, *a),
                                   feed=self._feed_watchdog)
        self.cotenants.restore_persisted({r.name for r in self.store.cotenants() if r.suspended})
        self._daemon_id = self.store.daemon_started(
            pid=os.getpid(), hostname=socket.gethostname(),
            experimental_paging=self.experimental_paging)
        log.info("daemon started", pid=os.getpid(), experimental_paging=self.experimental_paging,
                 burst=self.burst, state_dir=str(self.cfg.paths.state_dir))

    def _fence_workers(self) -> None:
        """Say once which protection workers run without; move what workers kept in state_dir
        itself (before it became read-only to them) into the worker state folder."""
        fence = self.executors.local.fence
        moved = move_legacy_worker_state(self.cfg.paths.state_dir, self.cfg.worker_state_dir)
        if moved:
            log.info("moved worker state into its kind's folder", names=moved,
                     to=str(self.cfg.worker_state_dir))
        if fence is None:
            return
        self.writes.may(self.store.set_meta, SANDBOX_META, fence.describe())
        if fence.missing:
            log.warning("workers are not sandboxed", missing=fence.missing)
        else:
            log.info("workers sandboxed with Landlock", abi=fence.abi,
                     writable=fence.describe()["writable"])

    def close(self) -> None:
        if not self._opened:
            return
        if hasattr(self, "cotenants"):   # open() got that far
            self.cotenants.restore_all("daemon shutdown")
        if not self.writes.retry(force=True):
            log.error("daemon exits with store writes it could not make; the next start "
                      "reconciles those runs", pending=[(w.__qualname__, a) for w, a, _ in self.writes.pending])
        if self._daemon_id:
            self.writes.may(self.store.daemon_heartbeat, self._daemon_id, stopped=True)
        self.outcomes.close()                           # notifications in flight
        self.status_file.close()
        self.store.close()

    def should_exit(self) -> bool:
        if self.workers or (self.writes.pending and not self._cold):
            return False  # outcomes still to write: wait for the store (a cold stop gives up)
        if self._stopping_since is not None:
            return True
        return self.burst and self.writes.fault is None and not self._admissible_waiting()

    def _admissible_waiting(self) -> bool:
        """A paused queue admits nothing: --burst ends instead of waiting for a `resume`."""
        return (self.store.count_by_state().get(RunState.QUEUED, 0) > 0
                and controls(self.store).paused_since is None)

    # -- signals --------------------------------------------------------------------------------
    def on_signal(self, signum: int, _frame: Any = None) -> None:
        """The signal handler (SIGTERM/SIGINT): it only records the signal; the loop acts."""
        self.wakeup.signals.append(signum)

    def _handle_signals(self) -> None:
        while self.wakeup.signals:
            sig = self.wakeup.signals.pop(0)
            if self._stopping_since is None:
                self._stopping_since = self.host.monotonic()
                log.info("warm shutdown: no new runs; running ones may finish",
                         signal=signal_name(sig), grace_s=self.cfg.limits.shutdown_grace_s,
                         running=len(self.workers))
                self.notifier.stopping(self._sd_status())
                self._detach_remote()
            elif not self._cold:
                self._cold = True
                log.info("cold shutdown: stopping running runs now", signal=signal_name(sig))

    def _wait(self) -> None:
        fds = [fd for w in self.workers.values() for fd in w.executor.fds(w)]
        self.wakeup.wait(fds, min(self.cfg.daemon.poll_interval_s,
                                  self.cfg.guards.guard_interval_s))

    # -- one tick -------------------------------------------------------------------------------
    def tick(self) -> None:
        """Workers are supervised every tick; while the store refuses writes (disk full, I/O
        error, read-only) nothing is admitted and store reads that fail are skipped."""
        self._pump()
        self._reap()
        self._handle_signals()
        self._enforce()
        try:
            self._guard_tick()
        except StoreUnavailable as exc:   # guard actions were taken; the co-tenant step waits
            self.writes.failed(exc)
        if self.writes.retry() and self._stopping_since is None:
            try:
                self.schedules.dispatch(self.store, self.experimental_paging)
                ensure_retries(self.store, base_s=self.cfg.retries.base_s,
                               max_s=self.cfg.retries.max_s)
                cancel_unsatisfiable(self.store)
                self._admit()
                self.auto_backup.tick(self.host.time())
                self.retention.tick(self.host.time())
            except StoreUnavailable as exc:   # a claim is one transaction: nothing half-done
                self.writes.failed(exc)
        now = self.host.monotonic()
        if now - self._last_heartbeat >= HEARTBEAT_EVERY_S and self._daemon_id:
            self.writes.may(self.store.daemon_heartbeat, self._daemon_id)
            self._last_heartbeat = now
        self.notifier.tick(now, self._sd_status)

    def _on_store_fault(self, fault: str | None) -> None:
        self.status_file.write({"store_fault": fault, "since": self.host.time(),
                                "pending_writes": len(self.writes.pending),
                                "retry_in_s": self.writes.backoff_s if fault else None})
        self.notifier.send(f"STATUS={self._sd_status()}")

    def _sd_status(self) -> str:
        if self.writes is not None and self.writes.fault is not None:
            return (f"store not writable, admissions paused, {len(self.workers)} running, "
                    f"{len(self.writes.pending)} writes pending: {self.writes.fault}")
        text = status_text(self.store.count_by_state(), running=len(self.workers),
                           stopping=self._stopping_since is not None)
        return text + (", queue paused" if controls(self.store).paused_since else "")

    def _pump(self) -> None:
        for w in list(self.workers.values()):
            self._handle_output(w, w.executor.read_output(w))
            for ev in w.executor.read_events(w):
                self.events.handle(w, ev, self.host.time())

    def _handle_output(self, w: RunHandle, lines: list[bytes]) -> None:
        self.outputs[w.run_id].write_lines(lines)

    def _reap(self) -> None:
        for w in list(self.workers.values()):
            code = w.executor.poll(w)
            if code is None:
                continue
            # Drain what the worker wrote before it exited.
            self._handle_output(w, w.executor.read_output(w, final=True))
            for ev in w.executor.read_events(w):
                self.events.handle(w, ev, self.host.time())
            w.executor.cleanup(w)
            near, rss, oom_kills = False, None, 0
            if code == -signal.SIGKILL:
                near, rss = self.guards.memory_evidence(w.run_id)
                now_kills = self.host.oom_kill_count()
                if now_kills is not None and w.oom_kills_at_start is not None:
                    oom_kills = now_kills - w.oom_kills_at_start
            state, reason = classify(WorkerExit(
                code, w.stop_state, w.stop_reason, forced=w.kill_sent_mono is not None,
                result_path=w.result_path, error=w.error, near_memory_limit=near,
                rss_bytes=rss, kernel_oom_kills=oom_kills, how=w.exit_how))
            # A command run records its program's code, not the worker's (sacct's ExitCode); a program that
            # a signal ended reports -N, recorded as that signal.
            recorded = (w.program_exit if code >= 0 and not w.exit_how and w.program_exit is not None
                        else code)
            fields: dict[str, Any] = {"exit_code": recorded if recorded >= 0 and not w.exit_how else None,
                                      "signal": signal_name(-recorded) if recorded < 0 else None}
            if state is RunState.QUEUED:
                fields.update(pid=None, pid_create_time=None, started_at=None, running_at=None)
            self.writes.must(self.store.transition, w.run_id, state, reason, **fields)
            log_for(w.needs_paging, "lab_attendant.daemon.loop").info(
                "run ended", run_id=w.run_id, state=str(state), reason=reason)
            self.outcomes.ended(w.run_id, state, reason, now=self.host.time(),
                                exit_code=fields["exit_code"], signal=fields["signal"])
            self.outputs.pop(w.run_id).close()
            self.guards.forget(w.run_id)
            self.sampler.forget(w.run_id)
            del self.workers[w.run_id]

    def _enforce(self) -> None:
        now = self.host.monotonic()
        cancelled: set[int] = set()
        if self.workers:
            try:   # an unreadable store costs cancels this tick, never timeouts or shutdown
                cancelled = {r.id for r in self.store.list_runs(states=ACTIVE)
                             if r.cancel_requested}
            except StoreUnavailable as exc:
                self.writes.failed(exc)
        grace_over = (self._stopping_since is not None and
                      now - self._stopping_since >= self.cfg.limits.shutdown_grace_s)
        for w in self.workers.values():
            if w.run_id in cancelled:
                w.executor.stop(w, RunState.CANCELLED, "cancelled by user")
            elif now >= w.deadline_mono:
                timeout = w.deadline_mono - w.started_mono
                w.executor.stop(w, RunState.TIMED_OUT, f"timed out after {timeout:g} s")
            elif self._cold or grace_over:
                why = "cold shutdown" if self._cold else (
                    f"shutdown grace of {self.cfg.limits.shutdown_grace_s:g} s ran out")
                w.executor.stop(w, RunState.QUEUED, f"requeued: daemon stopped ({why})")
            if self._cold and w.stop_state is RunState.QUEUED:
                w.executor.kill_now(w)
            elif w.executor.escalate(w):
                log_for(w.needs_paging, "lab_attendant.daemon.loop").warning(
                    "worker ignored SIGTERM; sent SIGKILL", run_id=w.run_id,
                    grace_s=self.cfg.limits.kill_grace_s)

    def _admit(self) -> None:
        queue = controls(self.store)     # `pause` and `parallel N`, read each tick
        if queue.paused_since is not None:
            return   # holds too wait: "held: waiting for the co-tenant" would not be true now
        hold = self._paging_hold()
        self._apply_holds(hold)
        while len(self.workers) < queue.parallel(self.cfg.limits.max_concurrent):
            run = self.store.claim_next(exclude_paging=hold is not None)
            if run is None:
                return
            self._spawn(run)

    def _paging_hold(self) -> Hold | None:
        """Why paging runs may not start now, or None."""
        if not self.experimental_paging:
            return HOLD_PAGING_OFF
        return self.guards.hold or self.cotenants.hold()

    def _apply_holds(self, hold: Hold | None) -> None:
        for run in self.store.list_runs(states=[RunState.HELD]):
            if run.needs_paging and run.hold_code != USER_HOLD and (   # only `release` lifts it
                    hold is None or run.hold_code != hold.code):
                self.store.transition(run.id, RunState.QUEUED,
                                      "hold lifted" if hold is None else "hold changed",
                                      expect={RunState.HELD})
        if hold is None:
            return
        for run in self.store.list_runs(states=[RunState.QUEUED]):
            if run.needs_paging:
                self.store.transition(run.id, RunState.HELD, hold.reason, expect={RunState.QUEUED},
                                      hold_code=hold.code)
                log_for(True).info("run held", run_id=run.id, reason=hold.reason)

    # -- guards and co-tenants ------------------------------------------------------------------
    def _guard_tick(self) -> None:
        now = self.host.monotonic()
        if now - self._last_guard < self.cfg.guards.guard_interval_s:
            return
        self._last_guard = now
        infos = [WorkerInfo(w.run_id, w.pid, w.needs_paging) for w in self.workers.values()
                 if w.kill_sent_mono is None and w.is_local and w.pid is not None]
        for action in self.guards.poll(infos):
            self._guard_action(action)
        waiting = self.store.list_runs(states=WAITING)
        paging_wanted = (self.experimental_paging and self.guards.hold is None
                         and self._stopping_since is None
                         and any(r.needs_paging and r.hold_code != USER_HOLD for r in waiting)
                         and controls(self.store).paused_since is None)   # paused: no EarNode stop
        self.cotenants.step(paging_wanted=paging_wanted,
                            paging_active=any(w.needs_paging and w.is_local
                                              for w in self.workers.values()),
                            gpus=self.guards.last_gpus)
        hold = self._paging_hold()
        readings = {"at": self.host.time(), **self.guards.readings,
                    "paging_hold": hold and hold.reason,
                    "cotenants": {c.name: c.phase for c in self.cotenants.items}}
        # One commit per tick: the readings `status` shows and the run samples taken from them.
        self.writes.may(samples.save, self.store, self.sampler.take(self.host.time(), self.workers.values(),
                                                        self.guards),
                        self.cfg.metrics.samples_per_run, readings=readings)
        self.outcomes.tick(now)

    def _guard_action(self, a: Action) -> None:
        w = self.workers.get(a.run_id) if a.run_id is not None else None
        self.writes.must(self.store.add_guard_event, guard=a.guard, action=a.action.value, reason=a.reason,
                         run_id=a.run_id, reading=a.reading)
        paging = w.needs_paging if w else a.guard == "thermal"
        log_for(paging, "lab_attendant.guards.policy").warning(
            "guard " + a.action.value, guard=a.guard, run_id=a.run_id, reason=a.reason)
        if a.action is GuardAction.KILL and w is not None:
            assert a.state is not None, "a kill names the state it ends the run in"
            w.executor.stop(w, a.state, a.reason, grace_s=self.cfg.guards.kill_grace_s)

    def _cotenant_event(self, name: str, action: CotenantAction, reason: str) -> None:
        self.writes.must(self.store.add_guard_event, guard=f"cotenant:{name}", action=action.value,
                         reason=reason)
        log_for(True, "lab_attendant.guards.cotenants").info("co-tenant " + action.value,
                                                             cotenant=name, reason=reason)

    def _spawn(self, run) -> None:
        python = self.executors.python_for(run.executor)
        try:
            spec = build_spec(self.cfg, self.kinds, run, python,
                              python_is_here=self.executors.of(run.executor).is_local)
        except ConfigError as exc:
            self._spawn_failed(run, str(exc))
            return
        run_dir = Path(spec.run_dir)
        output = RunOutput(self.cfg.paths.logs_dir, run.id, run.needs_paging)
        try:
            w = self.executors.start(spec, python=Path(python), timeout_s=run.timeout_s,
                                     executor=run.executor)
        except OSError as exc:
            output.close()
            self._spawn_failed(run, f"could not start worker: {exc}")
            return
        self.workers[run.id] = w
        self.outputs[run.id] = output
        self.outcomes.started(run, w.pid)
        self.writes.must(self.store.update_run, run.id, pid=w.pid, run_dir=str(run_dir),
                         log_path=str(output.path), executor_job_id=w.job_id,
                         pid_create_time=w.pid and self.host.process_create_time(w.pid))
        if w.requested:   # e.g. sbatch --mem from the memory plan: `show` lists it
            self.writes.must(self.store.add_event, run.id, "requested", w.requested)
        log_for(run.needs_paging, "lab_attendant.daemon.loop").info(
            "run spawned", run_id=run.id, kind=run.kind, pid=w.pid, job_id=w.job_id)

    def _spawn_failed(self, run, reason: str) -> None:
        self.writes.must(self.store.transition, run.id, RunState.FAILED, reason)
        self.outcomes.ended(run.id, RunState.FAILED, reason, now=self.host.time(), run=run)

    # -- start-up reconciliation ----------------------------------------------------------------
    def reconcile(self) -> None:
        """Runs a dead daemon left active end `lost` (lab_attendant.daemon.reconcile); the systemd
        watchdog keeps being fed while their groups are given kill_grace_s to go."""
        runs = self.executors.forget_unrecorded(self.store.list_runs(states=ACTIVE))
        for run in reconcile(self.store, self.host, self.cfg.limits.kill_grace_s,
                             self.cfg.runs_dir, self._feed_watchdog, keep=self.executors.reattachable):
            self.outcomes.ended(run.id, RunState.LOST, run.reason, now=self.host.time(),
                                run=run)
        for run in filter(self.executors.reattachable, runs):   # Slurm runs, by job id
            self.workers[run.id] = self.executors.reattach(run, self.store.get_meta)
            self.outputs[run.id] = RunOutput(self.cfg.paths.logs_dir, run.id, run.needs_paging)

    def _detach_remote(self) -> None:
        """Runs on Slurm go on without us; the next start re-attaches them by job id."""
        for rid in [rid for rid, w in self.workers.items() if w.executor.outlives_daemon]:
            w = self.workers.pop(rid)
            w.executor.cleanup(w)
            self.outputs.pop(rid).close()
            log.info("detached from a Slurm run; the next daemon start re-attaches it",
                     run_id=rid)

    def _feed_watchdog(self) -> None:
        self.notifier.tick(self.host.monotonic(),
                           lambda: "waiting for worker groups or co-tenant commands")

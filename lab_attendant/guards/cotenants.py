"""GPU co-tenants (EarNode): stopped before the first paging run is admitted, restored when
none remain; the suspension is persisted so that a daemon restarted after a crash restores it.

Every wait is a phase the daemon's tick steps through (a command running, memory being released,
a start after a failed stop), so the loop never blocks; only shutdown waits, feeding the watchdog.
"""
from __future__ import annotations

import subprocess
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import IO, Callable

from lab_attendant.config import CotenantConfig
from lab_attendant.guards.host import GpuReading
from lab_attendant.store.states import Hold

# Phases of one co-tenant, as the daemon's tick drives it.
RUNNING, STOPPING, RELEASING, SUSPENDED, STARTING, RECOVERING = (
    "running", "stopping", "releasing", "suspended", "starting", "recovering")
POLL_S = 0.1



class CotenantAction(str, Enum):
    """What happened to a co-tenant (stored as its value in guard_events.action)."""
    STOP = "stop"                      # its stop command was started
    SUSPENDED = "suspended"            # it stopped and released the GPU
    STOP_FAILED = "stop_failed"
    RESTORE = "restore"                # one a dead daemon left suspended is started again
    RESTORED = "restored"
    RESTORE_FAILED = "restore_failed"

    def __str__(self) -> str:
        return self.value


Record = Callable[[str, CotenantAction, str], None]   # (name, action, reason) -> guard event


@dataclass
class _Cmd:
    proc: subprocess.Popen
    output: IO[bytes]
    deadline: float


class Cotenant:
    def __init__(self, name: str, cfg: CotenantConfig, host, record: Record,
                 persist: Callable[[str, bool, str], None],
                 feed: Callable[[], None] = lambda: None) -> None:
        self.name, self.cfg, self.host = name, cfg, host
        self.record, self.persist, self.feed = record, persist, feed
        self.phase = RUNNING
        self.failure: str | None = None        # why the last stop failed (runs stay held)
        self.retry_at = 0.0
        self._cmd: _Cmd | None = None
        self._pid: int | None = None           # its pid before the stop, from pid_file
        self._used_before: int | None = None   # GPU memory used before the stop
        self._release_deadline = 0.0

    # -- commands ---------------------------------------------------------------------------------
    def _launch(self, argv: tuple[str, ...]) -> None:
        proc, output = self.host.start_command(argv)
        self._cmd = _Cmd(proc, output, self.host.monotonic() + self.cfg.command_timeout_s)

    def _finished(self) -> tuple[bool, str] | None:
        """None while the command runs; (ok, output tail) when it ended or timed out."""
        cmd = self._cmd
        assert cmd is not None, "_finished() is called only while a command runs"
        code = cmd.proc.poll()
        if code is None and self.host.monotonic() < cmd.deadline:
            return None
        if code is None:
            cmd.proc.kill()
            cmd.proc.wait()
            ok, what = False, f"timed out after {self.cfg.command_timeout_s:g} s"
        else:
            ok, what = code == 0, f"exit code {code}"
        cmd.output.seek(0)
        out = cmd.output.read().decode(errors="replace").strip()
        cmd.output.close()
        self._cmd = None
        tail = out.splitlines()[-1][:200] if out else ""
        return ok, what + (f": {tail}" if tail else "")

    def _wait(self) -> tuple[bool, str]:
        """Shutdown only: wait (bounded by command_timeout_s) for the command, feeding the
        systemd watchdog meanwhile."""
        while (done := self._finished()) is None:
            self.feed()
            self.host.sleep(POLL_S)
        return done

    def run_blocking(self, argv: tuple[str, ...]) -> tuple[bool, str]:
        if self._cmd is not None:      # one in flight (a stop, a start): let it end first
            self._wait()
        self._launch(argv)
        return self._wait()

    def _read_pid(self) -> int | None:
        try:
            return int(Path(self.cfg.pid_file).read_text().split()[0]) if self.cfg.pid_file else None
        except (OSError, ValueError, IndexError):
            return None

    # -- release check ----------------------------------------------------------------------------
    def _released(self, gpus: list[GpuReading] | None) -> tuple[bool, str]:
        if self._pid is not None:
            if self.host.pid_alive(self._pid):
                return False, f"pid {self._pid} still alive"
            if gpus and any(self._pid in g.processes for g in gpus):
                return False, f"pid {self._pid} still holds GPU memory"
            return True, f"pid {self._pid} gone"
        if self.cfg.expected_vram_bytes and gpus and self._used_before is not None:
            used = sum(g.memory_used_bytes or 0 for g in gpus)
            freed = self._used_before - used
            if freed >= 0.8 * self.cfg.expected_vram_bytes:
                return True, f"{freed} bytes of GPU memory freed"
            return False, f"only {max(freed, 0)} bytes freed so far"
        return True, "release not verifiable (no pid_file and no GPU readings); trusting the stop"

    # -- the state machine ------------------------------------------------------------------------
    def step(self, *, want_suspended: bool, idle_s: float, gpus: list[GpuReading] | None) -> None:
        now = self.host.monotonic()
        if self.phase == RUNNING and want_suspended and now >= self.retry_at:
            self._pid = self._read_pid()
            self._used_before = sum(g.memory_used_bytes or 0 for g in gpus) if gpus else None
            self.persist(self.name, True, "stopping for a paging run")  # before: a crash restores
            self._launch(self.cfg.stop_argv)
            self.phase = STOPPING
            self.record(self.name, CotenantAction.STOP, f"stopping co-tenant {self.name}: "
                        f"{' '.join(self.cfg.stop_argv)}")
        elif self.phase == STOPPING:
            done = self._finished()
            if done is None:
                return
            ok, detail = done
            if ok:
                self.phase, self._release_deadline = RELEASING, now + self.cfg.release_timeout_s
            else:
                self._fail(f"co-tenant {self.name} did not stop ({detail})")
        if self.phase == RELEASING:
            released, detail = self._released(gpus)
            if released:
                self.phase, self.failure = SUSPENDED, None
                self.record(self.name, CotenantAction.SUSPENDED, f"co-tenant {self.name} suspended: {detail}")
            elif now >= self._release_deadline:
                self._fail(f"co-tenant {self.name} did not release the GPU within "
                           f"{self.cfg.release_timeout_s:g} s ({detail})")
        elif (self.phase == SUSPENDED and not want_suspended
              and idle_s >= self.cfg.restore_delay_s and now >= self.retry_at):
            self._launch(self.cfg.start_argv)
            self.phase = STARTING
        elif self.phase == RECOVERING:   # the start after a failed stop
            done = self._finished()
            if done is None:
                return
            ok, detail = done
            self.persist(self.name, not ok, "stop failed; " + ("restored" if ok else detail))
            self.phase = RUNNING   # never "ready" after a failure; the stop is retried at retry_at
        elif self.phase == STARTING:
            done = self._finished()
            if done is None:
                return
            ok, detail = done
            if ok:
                self.phase = RUNNING
                self.persist(self.name, False, "restored")
                self.record(self.name, CotenantAction.RESTORED, f"co-tenant {self.name} restored")
            else:
                self.phase, self.retry_at = SUSPENDED, now + self.cfg.retry_after_s
                self.record(self.name, CotenantAction.RESTORE_FAILED,
                            f"co-tenant {self.name} could not be restored ({detail}); "
                            f"retrying in {self.cfg.retry_after_s:g} s")

    def _fail(self, why: str) -> None:
        # It may be half-stopped: start it again (a phase, not a wait), and leave paging runs
        # held with `why`.
        self.failure = why + f"; retrying in {self.cfg.retry_after_s:g} s"
        self.retry_at = self.host.monotonic() + self.cfg.retry_after_s
        self.record(self.name, CotenantAction.STOP_FAILED, self.failure)
        self._launch(self.cfg.start_argv)
        self.phase = RECOVERING

    def restore_later(self) -> None:
        """Daemon start found it suspended by an earlier daemon: start it, as a phase."""
        self._launch(self.cfg.start_argv)
        self.phase = STARTING

    def restore_now(self, why: str) -> None:
        ok, detail = self.run_blocking(self.cfg.start_argv)
        self.record(self.name, CotenantAction.RESTORED if ok else CotenantAction.RESTORE_FAILED,
                    f"co-tenant {self.name} {'restored' if ok else 'not restored'} ({why}; {detail})")
        if ok:
            self.persist(self.name, False, why)
            self.phase = RUNNING


class Cotenants:
    """All configured co-tenants, stepped together by the daemon."""

    def __init__(self, cfgs: dict[str, CotenantConfig], host, record: Record,
                 persist: Callable[[str, bool, str], None],
                 feed: Callable[[], None] = lambda: None) -> None:
        self.items = [Cotenant(n, c, host, record, persist, feed) for n, c in cfgs.items()]
        self.host = host
        self._last_paging = host.monotonic()

    def restore_persisted(self, suspended_names: set[str]) -> None:
        """On daemon start: a crash may have left some suspended; their start runs as a phase
        the loop steps (paging runs stay held meanwhile), not as a wait before READY=1."""
        for c in self.items:
            if c.name in suspended_names:
                c.record(c.name, CotenantAction.RESTORE, f"co-tenant {c.name} was left suspended by an "
                         "earlier daemon; starting it")
                c.restore_later()

    def step(self, *, paging_wanted: bool, paging_active: bool,
             gpus: list[GpuReading] | None) -> None:
        now = self.host.monotonic()
        if paging_wanted or paging_active:
            self._last_paging = now
        for c in self.items:
            c.step(want_suspended=paging_wanted or paging_active,
                   idle_s=now - self._last_paging, gpus=gpus)

    @property
    def ready(self) -> bool:
        return all(c.phase == SUSPENDED for c in self.items)

    def hold(self) -> Hold | None:
        for c in self.items:
            if c.failure and c.phase != SUSPENDED:
                return Hold(f"cotenant_failed:{c.name}", c.failure)
        for c in self.items:
            if c.phase != SUSPENDED:
                return Hold(f"cotenant:{c.name}",
                            f"waiting for co-tenant {c.name} to stop and release its GPU memory")
        return None

    def restore_all(self, why: str) -> None:
        for c in self.items:
            if c.phase != RUNNING:
                c.restore_now(why)

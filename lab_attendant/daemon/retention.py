"""The daemon's `[retention]`: prune ended runs (lab_attendant.store.prune) once every
interval_s, the first time soon after start."""
from __future__ import annotations

from lab_attendant.config import Config
from lab_attendant.store.db import Store
from lab_attendant.store.prune import Pruned, RunFolders, prune


class Retention:
    def __init__(self, cfg: Config, store: Store) -> None:
        self.store, self.rc = store, cfg.retention
        self.folders = RunFolders(runs_dir=cfg.runs_dir, run_logs_dir=cfg.paths.logs_dir / "runs")
        self.last_wall: float | None = None

    def tick(self, now_wall: float) -> Pruned | None:
        rc = self.rc
        if not rc.older_than_days or (self.last_wall is not None
                                      and now_wall - self.last_wall < rc.interval_s):
            return None
        self.last_wall = now_wall
        return prune(self.store, self.folders, older_than_s=rc.older_than_days * 86400,
                     keep_failed=rc.keep_failed)

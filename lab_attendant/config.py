"""Configuration: frozen dataclasses loaded from one TOML file; unknown keys and wrong types fail.

Lookup order: --config PATH, $LAB_ATTENDANT_CONFIG, ./lab-attendant.toml, built-in defaults.
"""
from __future__ import annotations

import dataclasses
import json
import os
import pwd
import stat
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from jobs.contract.errors import SettingError
from jobs.contract.spec import DEFAULT_MODEL, DEFAULT_MODEL_FILE, ModelSettings, ModelSpec
from jobs.contract.typed import ByteSize, Reader
from jobs.paging.plan.settings import check_settings
from lab_attendant import PROJECT_ROOT
from lab_attendant.errors import ConfigError
from lab_attendant.store.states import TERMINAL
from lab_attendant.validate import check_config_numbers, check_schedules

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover
    import tomli as tomllib

CONFIG_ENV = "LAB_ATTENDANT_CONFIG"
DEFAULT_CONFIG_NAME = "lab-attendant.toml"

@dataclass(frozen=True)
class PathsConfig:
    state_dir: Path = Path("var")          # SQLite store, run folders (spec, outputs)
    logs_dir: Path = Path("logs")          # lab_attendant.log, experimental_paging.log, runs/
    models_dir: Path = Path("models")      # converted model folders (model import-default)
    # Folders that file paths in job params must lie under; unset = examples/ and models_dir
    # (never state_dir: a run would read the store, backups and other runs' outputs); [] = none.
    allowed_roots: tuple[Path, ...] | None = None
    backups: Path | None = None            # automatic store backups; default state_dir/backups


@dataclass(frozen=True)
class WorkerConfig:
    python: Path = PROJECT_ROOT / "venvs" / "experimental" / "bin" / "python"  # worker interpreter
    extra_kinds: tuple[str, ...] = ()      # stdlib-only modules with a KINDS list (plugins, tests)
    heartbeat_interval_s: float = 5.0      # worker -> supervisor liveness events
    default_model: str = DEFAULT_MODEL     # [models.NAME] used by jobs that get no -p model=
    # Landlock: a worker may write only its run folder, state_dir/worker, the user's caches and
    # these folders (the store, backups and other runs stay read-only to it); false: unconfined.
    sandbox: bool = True
    writable_paths: tuple[Path, ...] = ()


@dataclass(frozen=True)
class LimitsConfig:
    max_concurrent: int = 1                # runs in flight at once
    default_timeout_s: float = 6 * 3600.0  # per run unless `submit --timeout`
    kill_grace_s: float = 10.0             # SIGTERM -> SIGKILL delay for a worker's group
    shutdown_grace_s: float = 60.0         # warm shutdown: how long running runs may finish


@dataclass(frozen=True)
class DaemonConfig:
    poll_interval_s: float = 0.25          # main-loop tick when no worker output arrives


@dataclass(frozen=True)
class GuardsConfig:
    sensors: str = "nvml"                  # "nvml", "none", or "file:PATH" (simulation/tests)
    guard_interval_s: float = 1.0          # how often readings are taken and acted on
    thermal_limit_c: float = 85.0          # above this, paging workers are stopped
    resume_below_c: float = 75.0           # paging admissions resume below this
    kill_grace_s: float | None = None      # SIGTERM -> SIGKILL for guard kills; None: [limits]
    # GPU sensors that had answered and then fail (a lost GPU): paging runs are held at once;
    # running paging workers are stopped once the thermal guard has been blind this long.
    sensors_lost_grace_s: float = 30.0
    min_available_ram_bytes: ByteSize = ByteSize(512 * 1024**2)  # host floor; 0 = off
    max_worker_rss_bytes: ByteSize = ByteSize(0)     # one worker tree's RSS; 0 = off
    vram_budget_bytes: ByteSize = ByteSize(0)        # one worker tree's GPU memory; 0 = off
    vram_margin_bytes: ByteSize = ByteSize(256 * 1024**2)  # tolerated over vram_budget_bytes


@dataclass(frozen=True)
class CotenantConfig:
    """A GPU co-tenant (EarNode) suspended while paging runs are active."""
    unit: str | None = None                # systemd unit: systemctl stop/start UNIT
    stop: tuple[str, ...] = ()             # or argv lists (never shell strings)
    start: tuple[str, ...] = ()
    pid_file: Path | None = None           # its main pid: release = pid gone from GPU and host
    expected_vram_bytes: ByteSize = ByteSize(0)  # without pid_file: wait for this much to free
    release_timeout_s: float = 30.0        # how long to wait for its GPU memory after stop
    restore_delay_s: float = 10.0          # restore once no paging run was active this long
    command_timeout_s: float = 60.0        # a stop/start command running longer has failed
    retry_after_s: float = 60.0            # after a failed stop, try again this much later

    @property
    def stop_argv(self) -> tuple[str, ...]:
        return ("systemctl", "stop", self.unit) if self.unit else self.stop

    @property
    def start_argv(self) -> tuple[str, ...]:
        return ("systemctl", "start", self.unit) if self.unit else self.start


@dataclass(frozen=True, kw_only=True)
class ModelConfig(ModelSettings):
    """A [models.NAME] table: the settings (defaults in jobs.contract.spec.ModelSettings) and a folder."""
    path: Path | None = None               # model folder; default models_dir/NAME

    def __post_init__(self) -> None:
        if self.keep_precise_layers < 0:
            raise ConfigError("[models.NAME] keep_precise_layers must be 0 or more")


# The embedded default is streamed for real from its GGUF: 16 MiB holds 4 of Gemma-3-270M's 3.8 MiB layers
# of blocks, i.e. 2 resident + 2 streaming slots, so 16 of 18 layers are read from the file every pass.
EMBEDDED_MODEL = ModelConfig(vram_budget_bytes=ByteSize(16 * 1024**2))


@dataclass(frozen=True)
class ScheduleConfig:
    id: str                                # names the schedule; runs carry it as schedule_id
    cron: str                              # 5 fields (minute first) or 6 (second first)
    kind: str                              # a registered job kind
    params: dict[str, Any] = field(default_factory=dict)  # as `submit -p`, validated per firing
    timezone: str = ""                     # IANA name, e.g. "Europe/Berlin"; "" = local time
    misfire_grace_s: float = 3600.0        # a firing missed by more than this is dropped
    retries: int | None = None             # failed/lost runs retried; None: [retries] kinds


@dataclass(frozen=True)
class LoggingConfig:
    # lab_attendant.log and experimental_paging.log roll over past this size (0 = never); only
    # the daemon rotates, CLI processes just append (see logsetup.py).
    max_bytes: int = 10 * 1024**2
    backup_count: int = 5                  # rotated files kept: <name>.1 ... <name>.N

    def __post_init__(self) -> None:
        if self.max_bytes < 0 or self.backup_count < 0:
            raise ConfigError("[logging] max_bytes and backup_count must be 0 or more")
        if self.max_bytes and not self.backup_count:
            raise ConfigError("[logging] backup_count must be 1 or more when max_bytes is set "
                              "(or set max_bytes = 0 to never rotate)")


@dataclass(frozen=True)
class RetriesConfig:
    # Runs that end failed or lost are retried this many times (`submit --retries` and a
    # schedule's `retries` override it); guard kills, oom, cancels and timeouts never are.
    kinds: dict[str, int] = field(default_factory=dict)   # kind name -> retries
    base_s: float = 60.0                   # wait before the 1st retry; doubles for each next one
    max_s: float = 3600.0                  # longest wait between attempts


@dataclass(frozen=True)
class BackupsConfig:
    keep: int = 7                          # automatic backups kept in [paths] backups
    interval_s: float = 24 * 3600.0        # one backup per interval while the daemon runs


@dataclass(frozen=True)
class RetentionConfig:
    # The daemon prunes ended runs (rows, run folders, run logs) that ended this many days ago,
    # once every interval_s; 0 = never (`lab-attendant prune --older-than 30d` does it by hand).
    older_than_days: float = 0.0
    keep_failed: bool = True               # keep failed/oom/timed_out/lost runs for post-mortems
    interval_s: float = 24 * 3600.0


@dataclass(frozen=True)
class ServiceConfig:
    # systemd WatchdogSec=: a main loop silent this long is killed and restarted (0 = off).
    watchdog_s: float = 30.0

    def __post_init__(self) -> None:
        if self.watchdog_s < 0:
            raise ConfigError("[service] watchdog_s must be 0 (off) or more seconds")


Executor = Literal["local", "slurm"]


@dataclass(frozen=True)
class SlurmConfig:
    """[executor.slurm]: how runs go to Slurm; unset values leave the cluster's defaults."""
    partition: str = ""                    # sbatch --partition; "" = the default partition
    account: str = ""                      # sbatch --account
    gres: str = ""                         # sbatch --gres, e.g. "gpu:1"
    cpus: int = 0                          # sbatch --cpus-per-task; 0 = cluster default
    mem_bytes: ByteSize = ByteSize(0)      # sbatch --mem (rounded up to MiB); 0 = cluster default
    time_grace_s: float = 60.0             # --time = the run's timeout + this, rounded up to min
    extra_args: tuple[str, ...] = ()       # more sbatch arguments, an argv list
    python: Path | None = None             # worker python as the nodes see it; None: [worker]
    poll_interval_s: float = 1.0           # one squeue call per interval serves every run
    settle_s: float = 5.0                  # after a job ends: wait for its last events this long


@dataclass(frozen=True)
class ExecutorConfig:
    """Where a run's worker runs: `submit --executor`, else models[NAME], kinds[KIND], default."""
    default: Executor = "local"
    kinds: dict[str, Executor] = field(default_factory=dict)    # kind name -> executor
    models: dict[str, Executor] = field(default_factory=dict)   # [models.NAME] name -> executor
    slurm: SlurmConfig = field(default_factory=SlurmConfig)

    def choose(self, kind: str, model: str | None, requested: str | None = None) -> str:
        return (requested or (self.models.get(model) if model else None)
                or self.kinds.get(kind) or self.default)


@dataclass(frozen=True)
class MetricsConfig:
    textfile: Path | None = None           # node_exporter textfile the daemon rewrites (*.prom)
    textfile_interval_s: float = 15.0      # ... this often, and whenever a run ends
    samples_per_run: int = 2000            # sensor samples kept per run; older ones thinned 2:1


@dataclass(frozen=True)
class NotifyConfig:
    on: tuple[str, ...] = ("failed", "oom", "killed_thermal", "lost")   # run end states
    command: tuple[str, ...] = ()          # argv; run info in LAB_ATTENDANT_* env vars, no shell
    url: str = ""                          # or an HTTP POST (ntfy-style topic URL), outbound only
    timeout_s: float = 10.0                # a command or POST taking longer has failed


@dataclass(frozen=True)
class Config:
    paths: PathsConfig = field(default_factory=PathsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    daemon: DaemonConfig = field(default_factory=DaemonConfig)
    guards: GuardsConfig = field(default_factory=GuardsConfig)
    cotenants: dict[str, CotenantConfig] = field(default_factory=dict)
    models: dict[str, ModelConfig] = field(default_factory=dict)   # [models.NAME]
    schedules: tuple[ScheduleConfig, ...] = ()                     # [[schedules]]
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    service: ServiceConfig = field(default_factory=ServiceConfig)
    backups: BackupsConfig = field(default_factory=BackupsConfig)
    retries: RetriesConfig = field(default_factory=RetriesConfig)
    executor: ExecutorConfig = field(default_factory=ExecutorConfig)
    retention: RetentionConfig = field(default_factory=RetentionConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    notify: NotifyConfig = field(default_factory=NotifyConfig)
    source: Path | None = None             # the TOML file read, None for built-in defaults

    @property
    def db_path(self) -> Path:
        return self.paths.state_dir / "lab_attendant.sqlite3"

    @property
    def backups_dir(self) -> Path:
        return self.paths.backups or self.paths.state_dir / "backups"

    @property
    def runs_dir(self) -> Path:
        return self.paths.state_dir / "runs"

    @property
    def worker_state_dir(self) -> Path:
        """What workers keep between runs, a folder per kind (kind_state_dir)."""
        return self.paths.state_dir / "worker"

    def kind_state_dir(self, kind: str) -> Path:
        """What one kind's workers keep between runs (nightly_insights' manifests, generate's partial
        completions, probe's measured disk bandwidth): the one folder of state_dir, besides its own run
        folder, that a worker of that kind may write; another kind's workers cannot change it."""
        return self.worker_state_dir / kind

    @property
    def base_dir(self) -> Path:
        """What relative paths in the config resolve against: the config file's folder."""
        return self.source.parent if self.source is not None else Path.cwd()

    @property
    def allowed_roots(self) -> tuple[Path, ...]:
        if self.paths.allowed_roots is not None:
            return self.paths.allowed_roots
        return (PROJECT_ROOT / "examples", self.paths.models_dir)

    def retries_for(self, kind: str, schedule: ScheduleConfig | None = None) -> int:
        if schedule is not None and schedule.retries is not None:
            return schedule.retries
        return self.retries.kinds.get(kind, 0)

    def model_spec(self, name: str | None) -> ModelSpec:
        """The resolved [models.NAME] table a worker gets in its spec; the embedded default
        model needs no table. ConfigError for a name the config does not define."""
        name = name or self.worker.default_model
        model = self.models.get(name)
        registered = read_registry(self.paths.state_dir) if model is None else {}
        model = model or registered.get(name)
        if model is None and name != DEFAULT_MODEL:
            known = ", ".join(sorted({*self.models, *registered, DEFAULT_MODEL}))
            raise ConfigError(f"unknown model '{name}'; add a [models.{name}] table to the config, "
                              f"register it with `lab-attendant model add {name} PATH`, or use one of: {known}")
        model = model or EMBEDDED_MODEL
        default_path = self.paths.models_dir / (DEFAULT_MODEL_FILE if name == DEFAULT_MODEL else name)
        return ModelSpec(name=name, path=str(model.path or default_path),
                         **model.settings())


# `lab-attendant model add` writes [models.NAME] tables here, not into the user's config file: read at each
# lookup, so a running daemon sees a model added after it started; the config's own tables win.
REGISTRY_NAME = "models.toml"


def read_registry(state_dir: Path, path: Path | None = None) -> dict[str, ModelConfig]:
    """The [models.NAME] tables of state_dir/models.toml, or of `path` (empty when there is none)."""
    path = path or state_dir / REGISTRY_NAME
    try:
        check_trusted(path, "model registry")
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, tomllib.TOMLDecodeError) as exc:
        raise ConfigError(f"model registry {path} cannot be read ({exc}); fix or delete it") from None
    unknown = set(data) - {"models"}
    if unknown:
        raise ConfigError(f"model registry {path} has unknown sections {sorted(unknown)}; it holds only "
                          "[models.NAME] tables")
    reader = Reader(f"model registry {path}", ConfigError, base_dir=state_dir, tables=True)
    return reader.value("models", data.get("models", {}), dict[str, ModelConfig])


def register_model(state_dir: Path, name: str, table: dict[str, str | int]) -> Path:
    """Add (or replace) [models.NAME] in the registry; `table` holds ModelConfig keys with plain values,
    checked by reading the result back before it replaces the file."""
    path = state_dir / REGISTRY_NAME
    if path.is_file():
        check_trusted(path, "model registry")
    data = tomllib.loads(path.read_text()) if path.is_file() else {}
    models = {**data.get("models", {}), name: table}
    text = "# written by `lab-attendant model add`; one [models.NAME] table per registered model\n"
    for model, keys in models.items():
        text += f"\n[models.{json.dumps(model)}]\n"
        text += "".join(f"{k} = {json.dumps(v)}\n" for k, v in keys.items())
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.new")
    tmp.write_text(text)
    try:
        model = read_registry(state_dir, tmp)[name]
        check_settings(ModelSpec(name=name, path=str(model.path), **model.settings()))
    except (SettingError, ConfigError) as exc:
        tmp.unlink()
        raise ConfigError(str(exc)) from None
    tmp.replace(path)
    return path


def check_trusted(path: Path, what: str) -> None:
    """A config names programs we run ([worker] python, [notify] command, co-tenant commands):
    one that another user owns or may write is refused, e.g. a ./lab-attendant.toml planted in
    a shared folder, which would otherwise run their program as us (as root under sudo)."""
    st = path.stat()
    me = os.geteuid()
    trusted = {me, 0}
    if me == 0 and os.environ.get("SUDO_UID", "").isdigit():
        trusted.add(int(os.environ["SUDO_UID"]))   # `sudo service install` with your own config
    if st.st_uid not in trusted:
        raise ConfigError(f"{what} {path} belongs to {_user_name(st.st_uid)}, not to you or root, "
                          "and could run their programs as you; use a file of your own "
                          f"(cp it and pass --config) or `chown {_user_name(me)} {path}`")
    if st.st_mode & 0o022:
        raise ConfigError(f"{what} {path} can be changed by other users (mode "
                          f"{stat.S_IMODE(st.st_mode):o}) and could run their programs as you; "
                          f"`chmod go-w {path}` and start again")


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def load_config(path: str | os.PathLike | None = None) -> Config:
    """Find and load the config (see module docstring); relative paths resolve against the
    config file's folder, or the current directory for built-in defaults."""
    if path is None:
        path = os.environ.get(CONFIG_ENV) or None
    if path is None and Path(DEFAULT_CONFIG_NAME).is_file():
        path = DEFAULT_CONFIG_NAME
    if path is None:
        return parse_config({}, base_dir=Path.cwd(), source=None)
    cfg_path = Path(path).expanduser().resolve()
    if not cfg_path.is_file():
        raise ConfigError(f"config file {cfg_path} does not exist; create it "
                          "(see examples/lab-attendant.toml) or drop --config")
    check_trusted(cfg_path, "config file")
    try:
        data = tomllib.loads(cfg_path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"config file {cfg_path} is not valid TOML: {exc}") from None
    return parse_config(data, base_dir=cfg_path.parent, source=cfg_path)


def parse_config(data: dict[str, Any], *, base_dir: Path, source: Path | None) -> Config:
    if "source" in data:
        raise ConfigError("unknown config section [source]")
    reader = Reader("config", ConfigError, base_dir=base_dir, tables=True)
    cfg = dataclasses.replace(reader.build(Config, data), source=source)
    check_schedules(cfg)
    _check(cfg)
    return cfg


def _check(cfg: Config) -> None:
    """Checks that span keys, or that a type alone cannot express."""
    check_config_numbers(cfg)
    for name in cfg.models:   # a setting its engine would ignore fails here, not in a worker
        try:
            check_settings(cfg.model_spec(name))
        except SettingError as exc:
            raise ConfigError(str(exc)) from None
    g = cfg.guards
    if not (g.sensors in ("nvml", "none") or g.sensors.startswith("file:")):
        raise ConfigError(f"config key 'guards.sensors' must be \"nvml\", \"none\" or "
                          f"\"file:PATH\", got {g.sensors!r}")
    if g.resume_below_c > g.thermal_limit_c:
        raise ConfigError("config key 'guards.resume_below_c' must not exceed "
                          "guards.thermal_limit_c")
    if g.guard_interval_s <= 0 or cfg.daemon.poll_interval_s <= 0:
        raise ConfigError("guards.guard_interval_s and daemon.poll_interval_s must be > 0")
    _check_observers(cfg)
    for name, c in cfg.cotenants.items():
        if bool(c.unit) == bool(c.stop or c.start):
            raise ConfigError(f"[cotenants.{name}] needs either unit = \"NAME.service\" or "
                              "both stop = [argv] and start = [argv]")
        if not c.unit and not (c.stop and c.start):
            raise ConfigError(f"[cotenants.{name}] needs both stop = [argv] and start = [argv]")


def _check_observers(cfg: Config) -> None:
    ended = sorted(s.value for s in TERMINAL)
    for state in cfg.notify.on:
        if state not in ended:
            raise ConfigError(f"config key 'notify.on' has unknown end state {state!r}; "
                              f"use some of: {', '.join(ended)}")
    if cfg.notify.command and cfg.notify.url:
        raise ConfigError("[notify] takes either command = [argv] or url = \"...\", not both")
    if cfg.notify.url and not cfg.notify.url.startswith(("http://", "https://")):
        raise ConfigError(f"config key 'notify.url' must start with http:// or https://, got "
                          f"{cfg.notify.url!r}")
    if cfg.notify.timeout_s <= 0 or cfg.metrics.textfile_interval_s <= 0:
        raise ConfigError("notify.timeout_s and metrics.textfile_interval_s must be > 0")
    if cfg.metrics.samples_per_run < 10:
        raise ConfigError("config key 'metrics.samples_per_run' must be 10 or more")

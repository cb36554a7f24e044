"""Our exceptions, in one place: each carries a sentence that tells the user what to do.

The CLI turns a UserError into exit code 2 and its message, on one line.
"""


class UserError(Exception):
    """Something the user can fix: bad config, bad params, unknown kind, missing file."""


class ConfigError(UserError):
    """The TOML config has an unknown key, a wrong type or an unreadable value."""


class StoreError(Exception):
    """The SQLite store is unusable (e.g. schema from a newer version)."""


class StoreUnusable(StoreError):
    """The store file is corrupt or cannot be read; the message names the file and the fix.
    The daemon exits with EXIT_STORE_UNUSABLE, which the systemd unit does not restart on."""


class StoreUnavailable(StoreError):
    """The store cannot be used right now (disk full, I/O error, read-only, locked): the daemon
    keeps supervising from memory and retries; the CLI reports it and exits 1."""


class StoreWriteError(StoreUnavailable):
    """A write to the store failed (disk full, I/O error, read-only)."""


class StoreReadError(StoreUnavailable):
    """A read from the store failed (I/O error, a lock held past busy_timeout)."""


EXIT_STORE_UNUSABLE = 3   # systemd: RestartPreventExitStatus=2 3


class TransitionError(Exception):
    """A state change that the table in states.py does not allow: a bug, not user input."""


class DaemonLockedError(UserError):
    """Another daemon already owns this state directory."""

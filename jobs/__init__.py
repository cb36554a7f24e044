"""Worker side of lab-attendant. `contract/` is the stdlib-only contract the supervisor imports too
(kinds registry, protocol, specs, errors, units, atomic writes, confinement); `kinds/` holds one module
per job kind, `lib/` the helpers they share, `paging/` the engine; `worker.py` is the worker's entry.
"""

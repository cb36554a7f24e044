"""Worker side of lab-attendant. The root holds the stdlib contract the supervisor imports (`kinds`,
`protocol`, `units`, `atomic`, `spec`, `errors`, `venv_check`), the worker entry and one module per
job kind; `lib/` holds the helpers the kinds share and `paging/` the engine (experimental venv only).
"""

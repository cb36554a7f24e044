"""Worker side of lab-attendant: job kinds, the worker entry point and the paging engine.

Only `kinds`, `protocol` and `units` are stdlib-only (the supervisor imports them); the rest
runs inside the experimental venv.
"""

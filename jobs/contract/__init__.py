"""The contract both sides import (stdlib only): kinds registry, worker protocol, specs, typed
reader, errors, units, atomic writes, path confinement, OOM classification.
"""

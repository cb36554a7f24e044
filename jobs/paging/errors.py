"""The engine's own exceptions, in one place so the worker and the MoE pager can map them to exit codes.

Each is a ValueError a user can cause, with a message that says what to do (bad folder, budget too small).
"""
from __future__ import annotations


class ModelFolderError(ValueError):
    """The folder is not a decoder-only safetensors model; the message says what is missing."""


class BudgetError(ValueError):
    """The memory budgets cannot run the model; the message says how many bytes are needed."""


class KernelError(ValueError):
    """Fused kernels were asked for where they cannot run (no CUDA, liger-kernel missing, unknown model)."""

"""The worker side's exceptions, in one place (stdlib only): the worker maps them to exit codes and
the supervisor imports the stdlib contract's (ParamError, SpecError) without torch.

Each is a ValueError a user can cause, with a message that says what to do.
"""
from __future__ import annotations


class SpecError(ValueError):
    """A worker spec file with an unknown, missing or mistyped key; the worker exits "bad spec"."""


class ParamError(ValueError):
    """A param that does not fit its kind's schema; the message says what to pass instead."""


class ModelFolderError(ValueError):
    """The folder is not a decoder-only safetensors model; the message says what is missing."""


class BudgetError(ValueError):
    """The memory budgets cannot run the model; the message says how many bytes are needed."""


class KernelError(ValueError):
    """Fused kernels were asked for where they cannot run (no CUDA, liger-kernel missing, unknown model)."""


class ModelUnavailable(ValueError):
    """The configured model cannot be opened (no folder, no config.json); says what to fix."""


class ArtifactError(ValueError):
    """An artifact file that cannot be read as one (bad front matter, bad JSONL line)."""


class UsageError(ValueError):
    """Bad command-line input to an engine front end (prompts, sizes); says what to pass."""


class SettingError(ValueError):
    """A model setting the model's engine cannot honour (e.g. vram_budget_bytes on a MoE model);
    refused rather than dropped, and the message says which setting to remove."""


class NonFiniteError(ValueError):
    """A hidden state or logit became inf/NaN while generating (e.g. a model that overflows fp16); the run
    fails instead of decoding garbage, and the message names the layer, the dtype and the setting to change."""

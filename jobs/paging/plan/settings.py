"""Which engine a model folder goes to (is_moe_folder) and which settings that engine cannot honour
(check_settings), stdlib only: the supervisor checks a config and a submit with them, the worker at open."""
from __future__ import annotations

import json
from pathlib import Path

from jobs.contract.errors import SettingError
from jobs.contract.spec import ModelSettings, ModelSpec
from jobs.paging.plan.gguf_header import is_gguf, read_header
from jobs.paging.plan.moe_layout import num_routed_experts

# What each engine has no use for, and why: refused unless left at its default. ram_budget_bytes applies
# to both: dense caches streamed layers in it, the expert pager holds at most that much of its experts in
# host RAM (pinned on CUDA) and reads the rest from the checkpoint on demand.
_IGNORED_BY = {
    "dense": (("expert_cache_bytes", "cache_policy"),
              "layer streaming has no experts to cache; its device budget is vram_budget_bytes"),
    "moe": (("vram_budget_bytes", "keep_precise_layers", "fp16_safe"),
            "the expert pager keeps every non-expert weight on the device and budgets only the experts "
            "(expert_cache_bytes); it streams no decoder layers, keeps none precise and has no fp16-safe path "
            "(a non-finite value still fails the run)"),
}


def is_moe_folder(model_dir: str | Path) -> bool:
    """True when the folder's config.json names routed experts (`num_local_experts`: Mixtral, gpt-oss;
    `num_experts`: Qwen-MoE, OLMoE; `n_routed_experts`: DeepSeek), top level or text_config; for a GGUF file,
    when its header's `ARCH.expert_count` does (read from the header, no weight byte)."""
    if is_gguf(model_dir):
        try:
            return bool(read_header(model_dir).arch_key("expert_count"))
        except SettingError:
            return False  # the dense engine says what is wrong with the file
    try:
        config = json.loads((Path(model_dir) / "config.json").read_text())
    except (OSError, ValueError):
        return False  # the dense engine says what is wrong with the folder
    return bool(num_routed_experts(config) or num_routed_experts(config.get("text_config") or {}))


def check_settings(spec: ModelSpec) -> None:
    """SettingError naming every setting of `spec` that its kind's engine would have to ignore."""
    names, why = _IGNORED_BY[spec.kind]
    default = ModelSettings()
    ignored = [f"{n} = {getattr(spec, n)!r}" for n in names if getattr(spec, n) != getattr(default, n)]
    if ignored:
        raise SettingError(f"model '{spec.name}' is {spec.kind} and cannot honour {', '.join(ignored)}: {why}; "
                           f"remove {'it' if len(ignored) == 1 else 'them'} from [models.{spec.name}] "
                           "(or drop the matching command-line flag)")



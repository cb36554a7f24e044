"""How much host RAM the MoE expert store holds, and which experts live in it (stdlib only, so the
supervisor and the memory plan can call it without torch or a single weight read).

The store keeps `experts_in_ram` experts in one exact-size arena (pinned on CUDA) and serves every other
expert from the checkpoint's mmap through a ring of `staging_slots` expert-sized slots in the same arena.
"""
from __future__ import annotations

from pathlib import Path
from typing import NamedTuple

from jobs.contract.errors import BudgetError
from jobs.contract.units import format_size

HOST_ALIGN = 64          # pinned.HostArena starts every view on a 64-byte boundary; slots are counted so
STAGING_SLOTS = 2        # one slot is read from disk while the copy out of the other runs
DEFAULT_PINNED_SHARE = 0.5  # CUDA, no ram_budget_bytes: pin at most this share of MemAvailable


class ExpertHostPlan(NamedTuple):
    experts_in_ram: int   # experts held in the arena
    arena_bytes: int      # bytes of the arena that holds them
    staging_bytes: int    # bytes of the staging ring (0 when every expert is in RAM)

    @property
    def host_bytes(self) -> int:
        """What the store holds in process RAM, and pins on CUDA: one registration of exactly this."""
        return self.arena_bytes + self.staging_bytes


def aligned(nbytes: int) -> int:
    """nbytes rounded up to HOST_ALIGN: what one view takes in a host arena (pinned.HostArena)."""
    return -(-int(nbytes) // HOST_ALIGN) * HOST_ALIGN


def slot_bytes(expert_bytes: int) -> int:
    """Bytes one expert takes in the arena: its size rounded up to the arena's alignment."""
    return aligned(expert_bytes)


def min_ram_budget_bytes(expert_bytes: int, staging_slots: int = STAGING_SLOTS) -> int:
    """The smallest ram_budget_bytes that can run when not every expert fits: the staging ring alone."""
    return staging_slots * slot_bytes(expert_bytes)


def expert_host_plan(total_experts: int, expert_bytes: int, ram_budget_bytes: int | None,
                     staging_slots: int = STAGING_SLOTS) -> ExpertHostPlan:
    """(experts_in_ram, arena_bytes, staging_bytes) for a budget; None: every expert in RAM.

    Every expert fits: all of them, no staging. Otherwise the staging ring is taken first and the rest
    of the budget holds as many whole experts as fit. arena_bytes + staging_bytes <= ram_budget_bytes,
    exactly: the arena registers these bytes and nothing is rounded up to a power of two.
    """
    slot = slot_bytes(expert_bytes)
    if ram_budget_bytes is None or total_experts * slot <= ram_budget_bytes:
        return ExpertHostPlan(total_experts, total_experts * slot, 0)
    staging = min_ram_budget_bytes(expert_bytes, staging_slots)
    if ram_budget_bytes < staging:
        raise BudgetError(
            f"the expert store needs at least {staging} bytes ({format_size(staging)}) of host RAM, its "
            f"staging ring of {staging_slots} experts x {slot} bytes, but ram_budget_bytes is {ram_budget_bytes} "
            f"({format_size(ram_budget_bytes)}); raise ram_budget_bytes to at least {staging}, or to "
            f"{total_experts * slot} to hold all {total_experts} experts in RAM")
    in_ram = min(total_experts, (ram_budget_bytes - staging) // slot)
    return ExpertHostPlan(in_ram, in_ram * slot, staging)


def resident_experts(num_layers: int, num_experts: int, experts_in_ram: int) -> list[tuple[int, int]]:
    """Which (layer, expert) keys the arena holds: expert 0 of every layer, then expert 1 of every
    layer, and so on, so each layer holds floor or ceil of experts_in_ram / num_layers.

    Spread, not layer by layer: every token passes every layer and Mixtral's router is near uniform,
    so either rule leaves the same expected number of disk reads per token, but spread evenly each
    layer's reads are about the same, and the router look-ahead prefetch can hide one layer's reads
    behind the layer before it; filled in layer order the last layers would read every miss from disk
    back to back.
    """
    keys = [(layer, expert) for expert in range(num_experts) for layer in range(num_layers)]
    return keys[:experts_in_ram]


def mem_available_bytes(meminfo: str | Path = "/proc/meminfo") -> int | None:
    """MemAvailable from /proc/meminfo in bytes; None where there is none (not Linux)."""
    try:
        text = Path(meminfo).read_text()
    except OSError:
        return None
    for line in text.splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024  # the kernel writes kB, meaning KiB
    return None


def default_ram_budget_bytes(total_experts: int, expert_bytes: int, available_bytes: int | None) -> int | None:
    """ram_budget_bytes when none is given on CUDA: every expert if they take at most half of the host's
    available RAM, else that half (pinned pages cannot be swapped: pinning all of a 16 GB host would take
    the desktop with it). None (no cap) when the available RAM is unknown."""
    if available_bytes is None:
        return None
    cap = int(available_bytes * DEFAULT_PINNED_SHARE)
    everything = total_experts * slot_bytes(expert_bytes)
    return min(everything, cap)

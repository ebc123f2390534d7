"""Nano-batched prefill: hide each row-parallel all-reduce of one nano-batch behind another's compute.

The token rows split into ``n`` contiguous ranges; range ``i`` attends to the keys and values ranges ``0 .. i``
wrote (chunked prefill), so attention stays exact. Per layer and range: wait for the previous down_proj
all-reduce, attention, o_proj, issue its all-reduce; then per range: wait for it, MLP, down_proj, issue. Each wait
sits just before the compute that needs it (with ``CUDA_DEVICE_MAX_CONNECTIONS=1`` none blocks runnable compute).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Callable

import torch
import torch.distributed as dist

from overlap_bench import strategies
from overlap_bench.research.decoder import (ROW_LAYERS, Dims, LayerWeights, attention, attention_input, mlp_input,
                                            split_attention)
from overlap_bench.strategies.pipeline import (PendingAllReduce, RowSplit, even_bounds, gloo_note,
                                               nccl_group, priority_reason, start_bounds)

SplitFn = Callable[[str, int], RowSplit]
"""``split(layer_name, rows) -> RowSplit``: how one nano-batch's row-parallel call splits its rows."""


@dataclass(frozen=True)
class NanoSettings:
    """The schedule: ``nanobatches`` token ranges; ``comm``: the all-reduce path where the strategy has none;
    ``priority``: a high-priority NCCL stream; ``attention``: ``split`` or ``lower-right`` (one masked SDPA call)."""

    nanobatches: int = 2
    comm: str = "stream"
    priority: bool = False
    attention: str = "split"

    def __post_init__(self) -> None:
        if isinstance(self.nanobatches, bool) or not isinstance(self.nanobatches, int) or self.nanobatches < 1:
            raise ValueError(f"nanobatches must be an integer >= 1, got {self.nanobatches!r}")
        if self.comm not in NANO_COMM:
            raise ValueError(f"comm must be one of {', '.join(NANO_COMM)}, got {self.comm!r}")
        if self.attention not in ATTENTION:
            raise ValueError(f"attention must be one of {', '.join(ATTENTION)}, got {self.attention!r}")


NANO_COMM = ("stream", "async")
"""The schedule's own all-reduce paths (the window paths need buffers only ``chunked`` allocates)."""
ATTENTION = ("split", "lower-right")


def nano_bounds(m: int, n: int) -> list[tuple[int, int]]:
    """``n`` contiguous near-equal token ranges covering ``m`` rows (sizes differ by at most one row)."""
    if n > m:
        raise ValueError(f"nanobatches={n} is more than the {m} token rows; use nanobatches <= tokens")
    return even_bounds(m, n)


def baseline_split(layer: str, rows: int) -> RowSplit:
    """Every nano-batch's row-parallel call as one product and one all-reduce."""
    return RowSplit(((0, rows),))


def strategy_split(choose: Callable[[str, int], tuple[str, Any]]) -> SplitFn:
    """``choose(layer, rows) -> (strategy, settings)`` turned into row splits (e.g. a policy's choice)."""

    def split(layer: str, rows: int) -> RowSplit:
        name, settings = choose(layer, rows)
        fn = strategies.get(name).split
        if fn is None:
            raise strategies.StrategyUnavailable(
                f"strategy '{name}' has no row split, so it cannot run inside a nano-batch")
        return fn(rows, settings)

    return split


def _issue(out: torch.Tensor, x: torch.Tensor, weight: torch.Tensor, sp: RowSplit, settings: NanoSettings,
           group: dist.ProcessGroup | None) -> PendingAllReduce:
    comm = sp.comm or settings.comm
    prio = sp.priority or settings.priority
    comm_group = nccl_group(group) if prio else group
    return start_bounds(out, x, weight, None, group, sp.bounds, comm, comm_group)


def nanobatch_forward(weights: list[LayerWeights], x: torch.Tensor, d: Dims, settings: NanoSettings,
                      split: SplitFn = baseline_split, group: dist.ProcessGroup | None = None,
                      trace: list | None = None) -> torch.Tensor:
    """The stack's prefill forward on nano-batches (``x`` is kept); ``trace`` gets its schedule's events:
    ``("attn", layer, i)``, ``("issue", name, layer, i)``, ``("wait", name, layer, i)``, ``("mlp", layer, i)``."""
    attend = split_attention if settings.attention == "split" else attention
    m = x.shape[0]
    bounds = nano_bounds(m, settings.nanobatches)
    kv_cols = 2 * d.kv_heads * d.head_dim

    def log(*event: Any) -> None:
        if trace is not None:
            trace.append(event)

    with torch.no_grad():
        cur = [x[s:e] for s, e in bounds]  # each nano-batch's input to the current layer (views)
        down: list[tuple[PendingAllReduce, torch.Tensor] | None] = [None] * len(bounds)
        for li, w in enumerate(weights):
            kv = torch.empty(m, kv_cols, dtype=x.dtype, device=x.device)  # this layer's keys/values, by row
            h_all = torch.empty(m, d.hidden, dtype=x.dtype, device=x.device)
            out_all = torch.empty(m, d.hidden, dtype=x.dtype, device=x.device)
            o_pending: list[PendingAllReduce] = []
            for i, (s, e) in enumerate(bounds):
                if down[i] is not None:
                    pend, h = down[i]
                    log("wait", "down_proj", li - 1, i)
                    cur[i] = pend.wait().add_(h)
                    down[i] = None
                log("attn", li, i)
                a = attention_input(w, cur[i], d, kv=kv, start=s, attend=attend)
                log("issue", "o_proj", li, i)
                o_pending.append(_issue(h_all[s:e], a, w.o_proj, split("o_proj", e - s), settings, group))
                del a
            for i, (s, e) in enumerate(bounds):
                log("wait", "o_proj", li, i)
                h = o_pending[i].wait().add_(cur[i])
                log("mlp", li, i)
                g = mlp_input(w, h, d)
                log("issue", "down_proj", li, i)
                down[i] = (_issue(out_all[s:e], g, w.down, split("down_proj", e - s), settings, group), h)
                del g
            del kv, o_pending
        for i, (pend, h) in enumerate(down):
            log("wait", "down_proj", len(weights) - 1, i)
            pend.wait().add_(h)
    return out_all


# ---------------------------------------------------------------------------------------------- model modes

def mode_plans(settings: NanoSettings, m: int, backend: str,
               policy_choose: Callable[[str, int], Any] | None = None,
               policy_notes: list[str] | tuple[str, ...] = ()) -> dict[str, dict[str, Any]]:
    """The ``nanobatch`` and ``nanobatch+policy`` model modes' plans at ``M = m``; ``policy_choose(layer, rows)``:
    a policy's ``Choice`` for one nano-batch's rows (None: ``nanobatch+policy`` skipped)."""
    if settings.nanobatches > m:
        why_not: str | None = f"nanobatches={settings.nanobatches} is more than the {m} tokens"
    else:
        why_not = priority_reason(settings.priority, backend)
    sizes = [e - s for s, e in nano_bounds(m, settings.nanobatches)] if why_not is None else []
    info = {**asdict(settings), "rows": sizes}
    note = gloo_note(settings.comm, backend)
    plans: dict[str, dict[str, Any]] = {"nanobatch": {
        "forward": lambda weights, x, d: nanobatch_forward(weights, x, d, settings, baseline_split),
        "choices": {layer: "baseline" for layer in ROW_LAYERS}, "note": note, "nanobatch": info}}
    if why_not:
        plans["nanobatch"]["unavailable"] = why_not
    if policy_choose is None:
        plans["nanobatch+policy"] = {"skip": "no policy file given (--policy): nanobatch+policy mode skipped",
                                     "choices": None, "note": None}
        return plans
    picked = {layer: {rows: policy_choose(layer, rows) for rows in sorted(set(sizes))} for layer in ROW_LAYERS}
    notes = list(policy_notes) + ([note] if note else [])
    problems = []
    for layer, by_rows in picked.items():
        for c in by_rows.values():
            why = strategies.unavailable_reason(c.strategy, c.settings, backend)
            if why is None and strategies.get(c.strategy).split is None:
                why = f"no row split for {c.strategy}: cannot run inside a nano-batch"
            if why:
                problems.append(f"{layer} {c.label}: {why}")
    split = strategy_split(lambda layer, rows: (picked[layer][rows].strategy, picked[layer][rows].settings))
    plans["nanobatch+policy"] = {
        "forward": lambda weights, x, d: nanobatch_forward(weights, x, d, settings, split),
        "choices": {layer: " | ".join(dict.fromkeys(c.label for c in by_rows.values()))
                    for layer, by_rows in picked.items()},
        "choice_reasons": {layer: " | ".join(dict.fromkeys(c.reason for c in by_rows.values()))
                           for layer, by_rows in picked.items()},
        "note": "; ".join(dict.fromkeys(notes)) or None, "nanobatch": info}
    if why_not or problems:
        plans["nanobatch+policy"]["unavailable"] = "; ".join(([why_not] if why_not else []) + problems)
    return plans

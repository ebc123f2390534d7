"""A drop-in row-parallel linear layer whose GEMM / all-reduce overlap is picked per call by a policy."""

from __future__ import annotations

import logging
import math
from typing import Callable

import torch
import torch.distributed as dist
from torch import nn

from overlap_bench import strategies
from overlap_bench.metrics import REFERENCE, is_reference
from overlap_bench.policy import Choice, Policy

log = logging.getLogger("overlap_bench.layer")


def _group_size(group: dist.ProcessGroup | None) -> int:
    if not dist.is_initialized():  # torch's own error is a traceback about the default group
        raise RuntimeError("RowParallelLinear needs torch.distributed initialised: call dist.init_process_group() "
                           "first and run under torchrun (e.g. torchrun --nproc-per-node 2 app.py)")
    return dist.get_world_size(group)


def run_choice(choice: Choice, m: int, backend: str, warned: set[str], where: str,
               run: Callable[[Choice], torch.Tensor]) -> tuple[torch.Tensor | None, Choice]:
    """``(run(choice), choice)``, or ``(None, a baseline Choice)`` for the baseline and for a choice that cannot run
    on ``backend`` at ``m`` rows (unavailable, or a ``ValueError`` first), warned once per ``where`` and setting."""
    if is_reference(choice.label):
        return None, choice
    why = strategies.unavailable_reason(choice.strategy, choice.settings, backend)
    if why is None:
        try:
            return run(choice), choice
        except (ValueError, strategies.StrategyUnavailable) as exc:
            why = f"{type(exc).__name__}: {exc}"
    if f"{where} {choice.label}" not in warned:
        warned.add(f"{where} {choice.label}")
        log.warning("%s: %s (%s) cannot run for M=%d (%s); the baseline runs for such calls (warned once)",
                    where, choice.label, choice.reason, m, why)
    return None, Choice.baseline(f"{choice.label} cannot run for M={m}: {why}", choice.bucket)


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r @ W_r^T) + b``, ``W_r``: ``[out_features, in_features / ranks]``, the bias added once.
    With no policy it runs ``baseline``; every rank must see the same M. Inference only: autograd cannot follow
    the strategies' preallocated outputs and collectives."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None, policy: Policy | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        world = _group_size(group)
        if in_features % world:
            raise ValueError(f"in_features={in_features} is not divisible by the group size {world}")
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_rank = in_features // world
        self.group, self.policy = group, policy
        self.last_choice: Choice | None = None  # what ran on the latest forward
        self._warned: set[str] = set()
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank, **kw), requires_grad=False)
        self.bias = nn.Parameter(torch.empty(out_features, **kw), requires_grad=False) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.Linear's initialisation, with the fan-in of the full (unsplit) layer."""
        bound = 1 / math.sqrt(self.in_features)
        nn.init.uniform_(self.weight, -bound, bound)
        if self.bias is not None:
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_weight(cls, weight: torch.Tensor, bias: torch.Tensor | None = None,
                    group: dist.ProcessGroup | None = None, policy: Policy | None = None) -> "RowParallelLinear":
        """A layer around this rank's existing shard ``weight`` (``[N, K/tp]``) and the full ``bias``."""
        n, k = weight.shape
        layer = cls(k * _group_size(group), n, bias is not None, group, policy,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def choose(self, m: int) -> Choice:
        """The strategy for ``m`` token rows."""
        if self.policy is None or m == 0:
            return Choice.baseline("no policy" if self.policy is None else "no rows")
        return self.policy.choose(K=self.in_features_per_rank, N=self.out_features, M=m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in_features_per_rank]`` -> ``[..., out_features]``, all-reduced over the group; a choice
        that cannot run here runs the baseline instead (:func:`run_choice`), on every rank alike."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features_per_rank)
        with torch.no_grad():
            y, self.last_choice = run_choice(
                self.choose(x2.shape[0]), x2.shape[0], dist.get_backend(self.group), self._warned,
                f"RowParallelLinear K={self.in_features_per_rank}, N={self.out_features}",
                lambda c: strategies.run(c.strategy, x2, self.weight, self.bias, self.group, c.settings))
            if y is None:  # the baseline, as last_choice says
                y = strategies.run(REFERENCE, x2, self.weight, self.bias, self.group, self.last_choice.settings)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, in_features_per_rank={self.in_features_per_rank}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")

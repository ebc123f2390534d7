"""A drop-in row-parallel linear layer whose GEMM / all-reduce overlap is picked per call by a policy."""

from __future__ import annotations

import math

import torch
import torch.distributed as dist
from torch import nn

from overlap_bench import strategies
from overlap_bench.policy import Choice, Policy


class RowParallelLinear(nn.Module):
    """``y = all_reduce(x_r @ W_r^T) + b`` with ``W_r`` of shape ``[out_features, in_features_per_rank]``.

    ``in_features`` is the full input width, split evenly over the group's ranks. The bias is full-size on
    every rank; the strategies add it on the group's rank 0 only, so it is counted once. With no policy the
    layer always runs ``baseline``. Every rank must see the same M (true in tensor parallelism), so every
    rank picks the same strategy and the collectives match.

    Inference only, like vLLM's layer: the strategies write into preallocated outputs (``out=``) and call
    the collectives directly, neither of which autograd can differentiate, so parameters do not require
    grad and ``forward`` runs under ``no_grad``.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True,
                 group: dist.ProcessGroup | None = None, policy: Policy | None = None, *,
                 device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> None:
        super().__init__()
        world = dist.get_world_size(group)
        if in_features % world:
            raise ValueError(f"in_features={in_features} is not divisible by the group size {world}")
        self.in_features, self.out_features = in_features, out_features
        self.in_features_per_rank = in_features // world
        self.group = group
        self.policy = policy
        self.last_choice: Choice | None = None
        """The policy's answer on the latest forward (for logging and tests)."""
        kw = {"device": device, "dtype": dtype}
        self.weight = nn.Parameter(torch.empty(out_features, self.in_features_per_rank, **kw),
                                   requires_grad=False)
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
        layer = cls(k * dist.get_world_size(group), n, bias is not None, group, policy,
                    device=weight.device, dtype=weight.dtype)
        with torch.no_grad():
            layer.weight.copy_(weight)
            if bias is not None:
                layer.bias.copy_(bias)
        return layer

    def choose(self, m: int) -> Choice:
        """The strategy for ``m`` token rows."""
        if self.policy is None or m == 0:
            return Choice("baseline", strategies.make_settings("baseline"), "baseline", None,
                          "no policy" if self.policy is None else "no rows")
        return self.policy.choose(K=self.in_features_per_rank, N=self.out_features, M=m)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``x``: ``[..., in_features_per_rank]`` -> ``[..., out_features]``, all-reduced over the group."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, self.in_features_per_rank)
        choice = self.last_choice = self.choose(x2.shape[0])
        with torch.no_grad():
            y = strategies.run(choice.strategy, x2, self.weight, self.bias, self.group, choice.settings)
        return y.reshape(*lead, self.out_features)

    def extra_repr(self) -> str:
        return (f"in_features={self.in_features}, in_features_per_rank={self.in_features_per_rank}, "
                f"out_features={self.out_features}, bias={self.bias is not None}")

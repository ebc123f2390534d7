"""``PolicyRowwiseParallel``: torch's ``RowwiseParallel`` (a ``parallelize_module`` plan entry) whose product and
all-reduce run the policy's choice, with autograd through every path."""

from __future__ import annotations

import functools
import math
from typing import Any

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DeviceMesh, DTensor, Placement, Replicate
from torch.distributed.tensor.parallel import RowwiseParallel

from overlap_bench import strategies
from overlap_bench.layer import run_choice
from overlap_bench.metrics import is_reference
from overlap_bench.policy import Choice, Policy


class _RowParallel(torch.autograd.Function):
    """Forward: a strategy on this rank's shards (all-reduced, bias once); backward: the row-parallel linear's
    own, with no communication (the replicated output's gradient is the same on every rank)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, choice: Choice,
                group: dist.ProcessGroup) -> torch.Tensor:
        ctx.save_for_backward(x, weight)
        ctx.bias = bias is not None
        return strategies.run(choice.strategy, x, weight, bias, group, choice.settings)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        x, weight = ctx.saved_tensors
        need = ctx.needs_input_grad
        return (grad @ weight if need[0] else None, grad.t() @ x if need[1] else None,
                grad.sum(0) if ctx.bias and need[2] else None, None, None)


def _one_range(choice: Choice, m: int) -> bool:
    """Whether ``choice`` runs one product and one all-reduce at ``m`` rows (below its own threshold, as ``pr``)."""
    split = strategies.get(choice.strategy).split
    try:
        return split is not None and len(split(m, choice.settings).bounds) == 1
    except (ValueError, strategies.StrategyUnavailable):  # no plain row split: the strategy's own path decides
        return False


class PolicyRowwiseParallel(RowwiseParallel):
    """A drop-in for ``RowwiseParallel`` whose ``nn.Linear`` runs the policy's choice for its (K per rank, N) and
    the call's token rows; for baseline (or a choice below its threshold), a non-``Replicate`` output or an uneven
    K, torch's own forward runs. ``module.last_choice`` says what ran."""

    def __init__(self, *, policy: Policy, input_layouts: Placement | None = None,
                 output_layouts: Placement | None = None, use_local_output: bool = True) -> None:
        if not isinstance(policy, Policy):
            raise TypeError(f"PolicyRowwiseParallel: policy must be a Policy (overlap_bench.policy.load_policy(path) "
                            f"or load_policy_for(device, world, dtype)), got {type(policy).__name__}")
        super().__init__(input_layouts=input_layouts, output_layouts=output_layouts,
                         use_local_output=use_local_output)
        self.policy = policy
        self._warned: set[str] = set()

    def _apply(self, module: nn.Module, device_mesh: DeviceMesh) -> nn.Module:
        module = super()._apply(module, device_mesh)
        if isinstance(module, nn.Linear):  # an nn.Embedding stays torch's
            module.last_choice = None
            module.forward = functools.partial(self._forward, module, device_mesh)
        return module

    def choose(self, module: nn.Linear, mesh: DeviceMesh, m: int) -> Choice:
        """What ``module`` runs for ``m`` token rows (the policy's choice, or why torch's own path runs)."""
        n, k = module.weight.shape
        bucket = None
        if self.output_layouts != (Replicate(),):
            why = f"output layout {self.output_layouts[0]}: RowwiseParallel's reduce-scatter"
        elif k % mesh.size():
            why = f"K={k} does not split evenly over {mesh.size()} ranks"
        else:
            choice = self.policy.choose(K=k // mesh.size(), N=n, M=m)
            if is_reference(choice.label) or not _one_range(choice, m):
                return choice
            bucket = choice.bucket
            why = f"{choice.label} at M={m} is one product and all-reduce (below its own threshold)"
        return Choice.baseline(why, bucket)

    def _forward(self, module: nn.Linear, mesh: DeviceMesh, x: DTensor) -> DTensor:
        """``x``: Shard(-1) (torch's input hook made it so); a Replicate output for torch's output hook."""
        local = x.to_local()
        k, n = local.shape[-1], module.weight.shape[0]
        m = math.prod(local.shape[:-1])
        group = mesh.get_group()
        weight = module.weight.to_local()
        bias = module.bias.to_local() if module.bias is not None else None
        y, module.last_choice = run_choice(
            self.choose(module, mesh, m), m, dist.get_backend(group), self._warned,
            f"PolicyRowwiseParallel K={k}, N={n}",
            lambda c: _RowParallel.apply(local.reshape(m, k), weight, bias, c, group))
        if y is None:
            return type(module).forward(module, x)  # RowwiseParallel's: a Partial output, reduced by its hook
        return DTensor.from_local(y.view(*local.shape[:-1], n), mesh, [Replicate()], run_check=False)

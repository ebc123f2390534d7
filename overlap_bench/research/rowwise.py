"""The decoder's row-parallel layers under torch's ``parallelize_module`` (model modes ``rowwise``,
``rowwise+policy``); its own module since ``torch.distributed.tensor`` takes 0.6 s to import."""

from __future__ import annotations

import torch
from torch import nn
from torch.distributed.tensor import DeviceMesh, DTensor, Shard, init_device_mesh
from torch.distributed.tensor.parallel import ParallelStyle, RowwiseParallel, parallelize_module

from overlap_bench.policy import Policy
from overlap_bench.research.decoder import ROW_LAYERS, LayerWeights, RowFn
from overlap_bench.tp import PolicyRowwiseParallel


def parallel_rows(weights: list[LayerWeights], mesh: DeviceMesh, style: ParallelStyle) -> RowFn:
    """The row-parallel layers as ``nn.Linear`` modules laid out with ``style``, as a deployment builds them: on
    the meta device, then given this rank's shards (shared, not copied)."""
    fields = dict(zip(ROW_LAYERS, ("o_proj", "down")))  # the LayerWeights field of each row-parallel layer
    with torch.device("meta"):
        stack = nn.ModuleList(nn.ModuleDict({
            name: nn.Linear(getattr(w, f).shape[1] * mesh.size(), getattr(w, f).shape[0], bias=False)
            for name, f in fields.items()}) for w in weights)
    parallelize_module(stack, mesh, {f"*.{name}": style for name in ROW_LAYERS}, src_data_rank=None)
    by_shard = {}
    for w, mods in zip(weights, stack):
        for name, f in fields.items():
            shard = getattr(w, f)
            mods[name].weight = nn.Parameter(DTensor.from_local(shard, mesh, [Shard(1)], run_check=False),
                                             requires_grad=False)
            by_shard[id(shard)] = mods[name]
    return lambda layer, x, weight: by_shard[id(weight)](x)


def torch_tp_rows(weights: list[LayerWeights], device: torch.device, world: int,
                  policy: Policy | None) -> dict[str, RowFn]:
    """``{"rowwise": torch's RowwiseParallel, "rowwise+policy": PolicyRowwiseParallel}`` (the latter with a policy)
    over one mesh of the job's ``world`` ranks."""
    mesh = init_device_mesh(device.type, (world,))
    rows = {"rowwise": parallel_rows(weights, mesh, RowwiseParallel())}
    if policy is not None:
        rows["rowwise+policy"] = parallel_rows(weights, mesh, PolicyRowwiseParallel(policy=policy))
    return rows

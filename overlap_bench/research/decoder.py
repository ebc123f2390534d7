"""The synthetic tensor-parallel decoder stack every model mode runs: per layer
``h = x + o_proj(attn(qkv(rms_norm(x))))``, ``out = h + down_proj(silu(gate) * up)``, the two row-parallel products
run by a ``RowFn``. No embedding, RoPE or LM head: they carry no tensor-parallel communication."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F
from torch.torch_version import TorchVersion

from overlap_bench.presets import ModelPreset

ROW_LAYERS = ("o_proj", "down_proj")
"""The row-parallel layers of a decoder layer, as named in rows and policies."""
RMS_EPS = 1e-6
GQA_NATIVE = TorchVersion(torch.__version__) >= (2, 5)
"""Whether ``scaled_dot_product_attention`` takes ``enable_gqa``."""

RowFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""``row(layer_name, x [M, K/tp], weight [N, K/tp]) -> y [M, N]``, reduced over the ranks (or not: nocomm)."""


@dataclass(frozen=True)
class Dims:
    """Per-rank widths of one decoder layer at ``tp`` (heads, kv_heads, intermediate: this rank's share)."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    intermediate: int
    tp: int

    @classmethod
    def of(cls, preset: ModelPreset, tp: int) -> "Dims":
        return cls(preset.hidden, preset.heads // tp, preset.kv_heads // tp, preset.head_dim,
                   preset.intermediate // tp, tp)

    def row_shape(self, layer: str) -> tuple[int, int]:
        """``(K per rank, N)`` of a row-parallel layer, as policies key it."""
        k = self.heads * self.head_dim if layer == "o_proj" else self.intermediate
        return k, self.hidden


@dataclass
class LayerWeights:
    """One rank's shards of one decoder layer (``[out, in]``): ``qkv`` its q, k, v heads; ``gate_up`` its gate,
    then up rows; ``o_proj`` and ``down`` the row-parallel shards; the norms ``[hidden]`` (same on every rank)."""

    attn_norm: torch.Tensor
    qkv: torch.Tensor
    o_proj: torch.Tensor
    mlp_norm: torch.Tensor
    gate_up: torch.Tensor
    down: torch.Tensor


def _gen(device: torch.device, *keys: int) -> torch.Generator:
    seed = 0
    for k in keys:
        seed = (seed * 1_000_003 + int(k)) % (2**63 - 1)
    return torch.Generator(device=device).manual_seed(seed)


def _rand(shape: tuple[int, ...], fan_in: int, gen: torch.Generator, device: torch.device,
          dtype: torch.dtype) -> torch.Tensor:
    """``randn / sqrt(fan_in)`` drawn in fp32 (same numbers for every dtype), then cast."""
    return (torch.randn(shape, generator=gen, device=device, dtype=torch.float32) / math.sqrt(fan_in)).to(dtype)


def build_layer(preset: ModelPreset, tp: int, rank: int, layer: int, *, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> LayerWeights:
    """Rank ``rank``'s shards of layer ``layer``, scaled by ``1/sqrt(fan_in)`` of the full layer and seeded per
    (seed, layer, weight, rank): the rank-major concatenation of all shards is one dense model (tests use it)."""
    d = Dims.of(preset, tp)
    ones = torch.ones(d.hidden, device=device, dtype=dtype)
    shapes = {"qkv": ((d.heads + 2 * d.kv_heads) * d.head_dim, d.hidden, d.hidden),  # (out, in, full fan-in)
              "o_proj": (d.hidden, d.heads * d.head_dim, preset.heads * preset.head_dim),
              "gate_up": (2 * d.intermediate, d.hidden, d.hidden),
              "down": (d.hidden, d.intermediate, preset.intermediate)}
    return LayerWeights(attn_norm=ones, mlp_norm=ones.clone(), **{
        name: _rand((out, inp), fan_in, _gen(device, seed, layer, i, rank), device, dtype)
        for i, (name, (out, inp, fan_in)) in enumerate(shapes.items(), 1)})


def build_stack(preset: ModelPreset, tp: int, rank: int, layers: int, *, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> list[LayerWeights]:
    """``layers`` layers of this rank's shards."""
    return [build_layer(preset, tp, rank, i, dtype=dtype, device=device, seed=seed) for i in range(layers)]


def hidden_states(m: int, hidden: int, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The stack's input ``[M, hidden]``, identical for equal (M, seed) on every rank."""
    return torch.randn(m, hidden, generator=_gen(device, seed, 7, m), device=device, dtype=torch.float32).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """RMSNorm computed in fp32, returned in ``x``'s dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def _repeat_kv(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``k``, ``v`` with their heads repeated to ``q``'s (grouped-query attention on kernels without it)."""
    rep = q.shape[1] // k.shape[1]
    return (k, v) if rep == 1 else (k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA of ``q [1, Hq, Lq, D]`` over ``k, v [1, Hkv, Lk, D]``; ``Lq < Lk``: the last ``Lq`` positions
    (bottom-right mask). ``enable_gqa`` where flash takes it, else repeated kv heads (not the math kernel)."""
    gqa = {}
    if GQA_NATIVE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
        gqa = {"enable_gqa": q.shape[1] != k.shape[1]}
    else:
        k, v = _repeat_kv(q, k, v)
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    from torch.nn.attention.bias import causal_lower_right  # here: its import starts torch._dynamo (~1.5 s)

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), **gqa)


def _attention_lse(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """SDPA output and its log-sum-exp ``[B, H, Lq, 1]`` (at least fp32) for equal head counts: cuDNN's
    kernel on CUDA (torch's pick for the whole-sequence call on Hopper), the CPU flash kernel elsewhere."""
    if q.is_cuda:
        out, lse = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, causal, False)[:2]
    else:
        out, lse = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, 0.0, causal)[:2]
    return out, lse.to(torch.promote_types(q.dtype, torch.float32)).reshape(*q.shape[:3], 1)


def split_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """:func:`attention`, exact, as two calls: the queries over the first ``Lk - Lq`` keys (no mask) and over
    their own ``Lq`` keys (square causal), merged through their log-sum-exp in fp32."""
    lq, lk = q.shape[2], k.shape[2]
    if lq == lk:
        return attention(q, k, v)
    k, v = _repeat_kv(q, k, v)
    p = lk - lq
    o1, l1 = _attention_lse(q, k[:, :, :p], v[:, :, :p], causal=False)
    o2, l2 = _attention_lse(q, k[:, :, p:], v[:, :, p:], causal=True)
    lse = torch.logaddexp(l1, l2)
    acc = lse.dtype
    out = o1.to(acc).mul_((l1 - lse).exp_()).add_(o2.to(acc).mul_((l2 - lse).exp_()))
    return out.to(q.dtype)


def attention_input(w: LayerWeights, x: torch.Tensor, d: Dims, kv: torch.Tensor | None = None,
                    start: int = 0, attend: Callable[..., torch.Tensor] = attention) -> torch.Tensor:
    """RMSNorm, fused QKV, causal GQA attention: this rank's o_proj input ``[M, heads/tp * head_dim]``. With ``kv``,
    ``x`` is rows ``start ..`` of a longer sequence: its keys/values go to those rows, its queries attend causally."""
    m = x.shape[0]
    qkv = torch.mm(rms_norm(x, w.attn_norm), w.qkv.t())
    q_w, kv_w = d.heads * d.head_dim, d.kv_heads * d.head_dim
    q, k, v = qkv.split([q_w, kv_w, kv_w], dim=-1)
    if kv is not None:
        kv[start:start + m].copy_(qkv[:, q_w:])
        k, v = kv[:start + m].split([kv_w, kv_w], dim=-1)
    n = k.shape[0]
    # [L, H*D] -> [1, H, L, D] (strided views; the kernels take a unit last-dim stride)
    q = q.view(m, d.heads, d.head_dim).transpose(0, 1).unsqueeze(0)
    k = k.view(n, d.kv_heads, d.head_dim).transpose(0, 1).unsqueeze(0)
    v = v.view(n, d.kv_heads, d.head_dim).transpose(0, 1).unsqueeze(0)
    o = attend(q, k, v)
    del qkv, q, k, v
    return o.squeeze(0).transpose(0, 1).reshape(m, d.heads * d.head_dim)


def mlp_input(w: LayerWeights, h: torch.Tensor, d: Dims) -> torch.Tensor:
    """RMSNorm, fused gate/up, SiLU gate: this rank's down_proj input ``[M, intermediate/tp]``."""
    gu = torch.mm(rms_norm(h, w.mlp_norm), w.gate_up.t())
    gate, up = gu.split([d.intermediate, d.intermediate], dim=-1)
    out = F.silu(gate).mul_(up)
    del gu, gate, up
    return out


def stack_forward(weights: list[LayerWeights], x: torch.Tensor, d: Dims, row: RowFn) -> torch.Tensor:
    """The whole stack's prefill forward, ``row`` running the row-parallel products; ``x`` is not modified."""
    with torch.no_grad():
        for w in weights:
            h = row("o_proj", attention_input(w, x, d), w.o_proj).add_(x)
            x = row("down_proj", mlp_input(w, h, d), w.down).add_(h)
    return x

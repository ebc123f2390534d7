"""Model-level prefill benchmark: does a row-parallel overlap strategy still pay off inside a whole decoder?

A synthetic tensor-parallel decoder stack (gpt-fast style: small, flat, no framework) with a preset's real
per-rank shapes at ``tp = world``. Each layer::

    h   = x + o_proj(sdpa(qkv(rms_norm(x))))          # o_proj: row-parallel, all-reduce inside
    out = h + down_proj(silu(gate) * up)               # gate/up = gate_up(rms_norm(h)); down_proj: row-parallel

with a column-parallel fused QKV (``(heads/tp + 2*kv_heads/tp) * head_dim`` outputs), causal grouped-query
attention over one sequence of M tokens (prefill, batch 1) and a column-parallel fused gate/up. There is no
embedding, RoPE or LM head: they carry no tensor-parallel communication and do not change what is compared.

Modes, all measured in the same job on the same weights and inputs:

``baseline``  both row-parallel layers run the ``baseline`` strategy;
``pr``        both run ``pr`` (sglang #6923's fixed chunking; every registered peer strategy is a mode);
``policy``    each layer runs what ``Policy.choose(K, N, M)`` of a policy file answers (skipped without one);
``nanobatch`` the tokens split into nano-batches, each row-parallel all-reduce of one hidden behind another's
              compute (:mod:`overlap_bench.nanobatch`); ``nanobatch+policy`` also runs the policy's choice
              inside each nano-batch (skipped without a policy);
``nocomm``    the row-parallel layers skip the all-reduce: numerically wrong, timing only. It gives the share
              of the forward spent in row-parallel communication,
              ``comm_share = (t_baseline - t_nocomm) / t_baseline``, and its speedup is the ceiling that
              perfect overlap could reach. Each mode's model-level eta, ``metrics.model_eta``, is the part of
              that share it hid.

Every mode's final hidden states are checked against baseline's first (``numerics.TOLERANCE``); a failed
mode is recorded with its reason and not timed. Rank 0 writes one ``records.Record`` (``kind: model``) per
(M, mode) to ``model.jsonl``, rewritten atomically after each M, so an M that crashes the job keeps the
earlier ones. A record's ``speedup`` is ``metrics.speedup`` against the baseline mode at the same M
(``t_base_ms``), its ``eta`` the model eta, and its ``extra`` holds the model's own numbers (``tp``,
``layers``, ``comm_share``, ``t_nocomm_ms``, ``t_rounds_ms``, ``choices``, ...).
"""

from __future__ import annotations

import logging
import math
import os
import shlex
import statistics
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch
import torch.distributed as dist
import torch.nn.functional as F

from overlap_bench import check, metrics, nanobatch, runfolder, strategies
from overlap_bench.bench import agree_failure, try_case
from overlap_bench.errors import UserError
from overlap_bench.launch import JobConfig, RankContext, launch
from overlap_bench.world import in_torchrun, resolve
from overlap_bench.metrics import DTYPES, model_eta
from overlap_bench.numerics import TOLERANCE, rel_err, within_tolerance
from overlap_bench.presets import PRESETS, ModelPreset
from overlap_bench.records import Record
from overlap_bench.timing import allreduce_max, time_region

if TYPE_CHECKING:
    from rich.table import Table

log = logging.getLogger("overlap_bench.model")

MODES = ("baseline", *strategies.peers(), "policy", "nanobatch", "nanobatch+policy", "nocomm")
"""Modes in the order they are checked and timed (interleaved in that order, round after round); the
registry's peer strategies (``pr``) run as modes of their own."""
REFERENCE_MODES = ("baseline", "nocomm")
"""Modes every run includes: the numerics reference and the communication share (model eta needs both)."""
ROW_LAYERS = ("o_proj", "down_proj")
"""The row-parallel layers of a decoder layer, as named in rows and policies."""
RMS_EPS = 1e-6
MAX_ROUNDS = 3
"""The timed repetitions of each mode are split into up to this many rounds, modes interleaved per round."""

RowFn = Callable[[str, torch.Tensor, torch.Tensor], torch.Tensor]
"""``row(layer_name, x [M, K/tp], weight [N, K/tp]) -> y [M, N]``, reduced over the ranks (or not: nocomm)."""


# ---------------------------------------------------------------------------------------------- the stack

@dataclass(frozen=True)
class Dims:
    """Per-rank widths of one decoder layer at ``tp``."""

    hidden: int
    heads: int
    """Query heads on this rank (``heads / tp``)."""
    kv_heads: int
    """Key/value heads on this rank (``kv_heads / tp``)."""
    head_dim: int
    intermediate: int
    """MLP width on this rank (``intermediate / tp``)."""
    tp: int

    @classmethod
    def of(cls, preset: ModelPreset, tp: int) -> "Dims":
        return cls(preset.hidden, preset.heads // tp, preset.kv_heads // tp, preset.head_dim,
                   preset.intermediate // tp, tp)

    @property
    def qkv_out(self) -> int:
        return (self.heads + 2 * self.kv_heads) * self.head_dim

    def row_shape(self, layer: str) -> tuple[int, int]:
        """``(K per rank, N)`` of a row-parallel layer, as policies key it."""
        k = self.heads * self.head_dim if layer == "o_proj" else self.intermediate
        return k, self.hidden


@dataclass
class LayerWeights:
    """One rank's shards of one decoder layer (nn.Linear layout ``[out, in]``)."""

    attn_norm: torch.Tensor
    """``[hidden]``, identical on every rank."""
    qkv: torch.Tensor
    """``[(heads/tp + 2*kv_heads/tp) * head_dim, hidden]``: this rank's q heads, then its k, then its v."""
    o_proj: torch.Tensor
    """``[hidden, heads/tp * head_dim]``: row-parallel shard."""
    mlp_norm: torch.Tensor
    """``[hidden]``, identical on every rank."""
    gate_up: torch.Tensor
    """``[2 * intermediate/tp, hidden]``: this rank's gate rows, then its up rows."""
    down: torch.Tensor
    """``[hidden, intermediate/tp]``: row-parallel shard."""


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
    """Rank ``rank``'s shards of layer ``layer``: random, scaled by ``1/sqrt(fan_in)`` of the full layer.

    Each shard is seeded by (seed, layer, weight, rank), so shards differ per rank like a real checkpoint's
    and the rank-major concatenation of all ranks' shards is one consistent dense model (the tests use it).
    Norm weights are ones on every rank.
    """
    d = Dims.of(preset, tp)
    ones = torch.ones(d.hidden, device=device, dtype=dtype)
    return LayerWeights(
        attn_norm=ones,
        qkv=_rand((d.qkv_out, d.hidden), d.hidden, _gen(device, seed, layer, 1, rank), device, dtype),
        o_proj=_rand((d.hidden, d.heads * d.head_dim), preset.heads * preset.head_dim,
                     _gen(device, seed, layer, 2, rank), device, dtype),
        mlp_norm=ones.clone(),
        gate_up=_rand((2 * d.intermediate, d.hidden), d.hidden, _gen(device, seed, layer, 3, rank), device, dtype),
        down=_rand((d.hidden, d.intermediate), preset.intermediate, _gen(device, seed, layer, 4, rank), device,
                   dtype),
    )


def build_stack(preset: ModelPreset, tp: int, rank: int, layers: int, *, dtype: torch.dtype,
                device: torch.device, seed: int = 0) -> list[LayerWeights]:
    """``layers`` layers of this rank's shards."""
    return [build_layer(preset, tp, rank, i, dtype=dtype, device=device, seed=seed) for i in range(layers)]


def hidden_states(m: int, hidden: int, *, dtype: torch.dtype, device: torch.device, seed: int = 0) -> torch.Tensor:
    """The stack's input ``[M, hidden]``, unit-order values, identical for equal (M, seed) on every rank."""
    return torch.randn(m, hidden, generator=_gen(device, seed, 7, m), device=device, dtype=torch.float32).to(dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float = RMS_EPS) -> torch.Tensor:
    """RMSNorm computed in fp32, returned in ``x``'s dtype."""
    xf = x.float()
    xf = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return xf.to(x.dtype) * weight


def _gqa_native() -> bool:
    try:
        from torch.torch_version import TorchVersion

        return TorchVersion(torch.__version__) >= (2, 5)
    except (ImportError, ValueError, TypeError):
        return False


GQA_NATIVE = _gqa_native()
"""Whether ``scaled_dot_product_attention`` takes ``enable_gqa`` (torch >= 2.5)."""


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Causal SDPA of ``q [1, Hq, Lq, D]`` over ``k, v [1, Hkv, Lk, D]`` (grouped-query when ``Hkv < Hq``).

    ``Lq < Lk`` is chunked prefill: the queries are the last ``Lq`` positions of the ``Lk`` keys, so the
    causal mask is aligned to the bottom right (query ``i`` sees keys ``0 .. Lk - Lq + i``).
    ``enable_gqa`` is used where flash attention can take it (CUDA, half precision, torch >= 2.5); elsewhere
    the kv heads are repeated, which keeps the memory-efficient kernel usable (fp32 on CUDA) instead of
    the math kernel's ``M x M`` scores, and keeps torch 2.4 working. The repeat costs ``2*M*Hq*D`` copied
    elements, small beside the attention itself.
    """
    rep = q.shape[1] // k.shape[1]
    gqa = {}
    if rep > 1:
        if GQA_NATIVE and q.is_cuda and q.dtype in (torch.float16, torch.bfloat16):
            gqa = {"enable_gqa": True}
        else:
            k = k.repeat_interleave(rep, dim=1)
            v = v.repeat_interleave(rep, dim=1)
    if q.shape[2] == k.shape[2]:
        return F.scaled_dot_product_attention(q, k, v, is_causal=True, **gqa)
    from torch.nn.attention.bias import causal_lower_right

    return F.scaled_dot_product_attention(q, k, v, attn_mask=causal_lower_right(q.shape[2], k.shape[2]), **gqa)


def attention_input(w: LayerWeights, x: torch.Tensor, d: Dims, kv: torch.Tensor | None = None,
                    start: int = 0, attend: Callable[..., torch.Tensor] = attention) -> torch.Tensor:
    """RMSNorm, fused QKV, causal GQA attention: this rank's o_proj input ``[M, heads/tp * head_dim]``.

    With ``kv`` (``[M_total, 2 * kv_heads/tp * head_dim]``, keys then values per row), ``x`` holds the token
    rows ``start .. start + M`` of a longer sequence (chunked prefill): their keys and values are written to
    those rows of ``kv`` and the queries attend to ``kv``'s rows ``0 .. start + M``, which earlier calls
    filled for the earlier rows. Without it ``x`` is the whole sequence. ``attend(q, k, v)``: the attention
    kernel call (:func:`attention` or another exact one).
    """
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


def layer_forward(w: LayerWeights, x: torch.Tensor, d: Dims, row: RowFn) -> torch.Tensor:
    """One decoder layer; ``row`` runs the two row-parallel products (and their all-reduce)."""
    h = row("o_proj", attention_input(w, x, d), w.o_proj)
    h.add_(x)
    out = row("down_proj", mlp_input(w, h, d), w.down)
    return out.add_(h)


def stack_forward(weights: list[LayerWeights], x: torch.Tensor, d: Dims, row: RowFn) -> torch.Tensor:
    """The whole stack's prefill forward; ``x`` is not modified."""
    with torch.no_grad():
        for w in weights:
            x = layer_forward(w, x, d, row)
    return x


def strategy_row(choices: dict[str, tuple[str, Any]], group: dist.ProcessGroup | None = None) -> RowFn:
    """A row-parallel call running ``choices[layer] = (strategy, settings)`` (all-reduce inside)."""

    def row(layer: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        name, settings = choices[layer]
        return strategies.run(name, x, weight, None, group, settings)

    return row


def nocomm_row(layer: str, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """The row-parallel product without its all-reduce (wrong sums; timing only)."""
    return torch.mm(x, weight.t())


# ---------------------------------------------------------------------------------------------- per rank

def _free(ctx: RankContext) -> None:
    if ctx.device.type == "cuda":
        torch.cuda.empty_cache()


def _choices_text(choices: dict[str, tuple[str, Any]]) -> dict[str, str]:
    return {layer: strategies.label(name, settings) for layer, (name, settings) in choices.items()}


def _policy_meta_notes(policy, dtype: str, device_name: str) -> list[str]:
    notes = []
    meta = policy.meta or {}
    if meta.get("dtype") and meta["dtype"] != dtype:
        notes.append(f"policy tuned for {meta['dtype']}, run in {dtype}")
    if meta.get("device") and str(meta["device"]).replace(" ", "_").lower() != device_name.replace(" ", "_").lower():
        notes.append(f"policy tuned on {meta['device']}, run on {device_name}")
    return notes


def run_model(ctx: RankContext, preset: str, tokens: list[int], layers: int, policy_path: str | None,
              warmup: int, reps: int, out_dir: str, dtype: str = "bfloat16", seed: int = 0,
              modes: tuple[str, ...] = MODES, nano: nanobatch.NanoSettings | None = None,
              shapes_tp: int | None = None, env: dict[str, str] | None = None) -> None:
    """Every rank's part of the model benchmark (``launch`` calls it); rank 0 writes ``out_dir/model.jsonl``.

    Per M: inputs, the numerics check of every mode against baseline, then the timing of the modes that
    passed, interleaved round by round. ``model.jsonl`` is rewritten atomically with all records so far
    after each M. ``modes``: the modes to run (a subset of :data:`MODES`, in that order); ``nano``: the
    nano-batch modes' settings. ``shapes_tp``: per-rank shapes of this tensor-parallel size instead of the
    rank count (one rank's share of a larger job, e.g. tp=4 shapes on 1 GPU: the reduction then sums fewer
    shards). ``env``: the job's environment variant (recorded; the launcher sets it).
    """
    from overlap_bench.policy import load_policy

    modes = tuple(mode for mode in MODES if mode in modes or mode in REFERENCE_MODES)
    nano = nano or nanobatch.NanoSettings()

    p = PRESETS[preset]
    tp = shapes_tp or ctx.world
    d = Dims.of(p, tp)
    dt = DTYPES[dtype]
    tol = TOLERANCE[dtype]
    device_name = ctx.device_name
    policy = load_policy(policy_path, expect_world=tp) if policy_path else None
    policy_notes = _policy_meta_notes(policy, dtype, device_name) if policy is not None else []
    base_choice = {layer: ("baseline", strategies.make_settings("baseline")) for layer in ROW_LAYERS}
    peer_choices = {p: {layer: (p, strategies.make_settings(p)) for layer in ROW_LAYERS} for p in strategies.peers()}
    shapes = {layer: list(d.row_shape(layer)) for layer in ROW_LAYERS}
    job = _Job(preset, d.hidden, dtype, ctx, device_name, dict(env or {}), warmup, reps, nano,
               {"tp": tp, "layers": layers, "shapes": shapes}, policy_path, shapes_tp)
    folder = runfolder.RunFolder(out_dir)
    records: list[Record] = []

    weights, err = try_case(lambda: build_stack(p, tp, ctx.rank, layers, dtype=dt, device=ctx.device, seed=seed))
    err = agree_failure(err, ctx)
    if err:
        # Nothing can be measured at any M: record why and stop.
        records += [job.record(m, mode, "failed", f"weights: {err}") for m in tokens for mode in modes]
        if ctx.rank == 0:
            folder.write_records(records, runfolder.MODEL)
        return

    for m in tokens:
        plan: dict[str, dict[str, Any]] = {}
        # What each mode runs at this M.
        plan["baseline"] = {"row": strategy_row(base_choice), "choices": _choices_text(base_choice), "note": None}
        for p, choice in peer_choices.items():
            plan[p] = {"row": strategy_row(choice), "choices": _choices_text(choice),
                       "note": strategies.backend_note(p, choice["o_proj"][1], ctx.backend)}
        if policy is None:
            plan["policy"] = {"skip": "no policy file given (--policy): policy mode skipped", "choices": None,
                              "note": None}
        else:
            picked = {layer: policy.choose(K=d.row_shape(layer)[0], N=d.hidden, M=m) for layer in ROW_LAYERS}
            pchoice = {layer: (c.strategy, c.settings) for layer, c in picked.items()}
            notes = list(policy_notes)
            unavailable = []
            for layer, (name, settings) in pchoice.items():
                bn = strategies.backend_note(name, settings, ctx.backend)
                if bn and bn not in notes:
                    notes.append(bn)
                why = strategies.unavailable_reason(name, settings, ctx.backend)
                if why:
                    unavailable.append(f"{layer} {strategies.label(name, settings)}: {why}")
            plan["policy"] = {"row": strategy_row(pchoice), "choices": _choices_text(pchoice),
                              "choice_reasons": {layer: c.reason for layer, c in picked.items()},
                              "note": "; ".join(notes) or None}
            if unavailable:
                plan["policy"]["unavailable"] = "; ".join(unavailable)
        choose = None
        if policy is not None:
            def choose(layer: str, rows: int) -> Any:
                return policy.choose(K=d.row_shape(layer)[0], N=d.hidden, M=rows)
        plan.update(nanobatch.mode_plans(nano, m, ctx.backend, choose, policy_notes))
        plan["nocomm"] = {"row": nocomm_row, "choices": {layer: "nocomm" for layer in ROW_LAYERS},
                          "note": "row-parallel all-reduce skipped: timing only, numerics not checked"}

        if ctx.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(ctx.device)
        x, err = try_case(lambda: hidden_states(m, d.hidden, dtype=dt, device=ctx.device, seed=seed))
        err = agree_failure(err, ctx)
        if err:
            records += [job.record(m, mode, "failed", f"inputs: {err}", {"choices": plan[mode].get("choices")})
                        for mode in modes]
            _free(ctx)
            if ctx.rank == 0:
                folder.write_records(records, runfolder.MODEL)
            continue
        if ctx.world > 1:
            dist.broadcast(x, src=0)  # identical on every rank whatever the RNG does on each device

        # Numerics first: every mode's final hidden states against baseline's.
        status: dict[str, dict[str, Any]] = {}
        y_base, err = try_case(lambda: _forward(plan["baseline"], weights, x, d))
        err = agree_failure(err, ctx)
        if err:
            records += [job.record(m, mode, "failed", f"baseline forward: {err}",
                                   {"choices": plan[mode].get("choices")}) for mode in modes]
            del x
            _free(ctx)
            if ctx.rank == 0:
                folder.write_records(records, runfolder.MODEL)
            continue
        status["baseline"] = {"status": "ok", "rel_err": 0.0}
        for mode in modes[1:]:
            info = plan[mode]
            if "skip" in info:
                status[mode] = {"status": "skipped", "reason": info["skip"]}
                continue
            if "unavailable" in info:
                status[mode] = {"status": "unavailable", "reason": info["unavailable"]}
                continue
            y, err = try_case(lambda: _forward(info, weights, x, d))
            err = agree_failure(err, ctx)
            if err:
                status[mode] = {"status": "failed", "reason": err}
                _free(ctx)
                continue
            if mode == "nocomm":
                status[mode] = {"status": "ok", "rel_err": math.nan}
                del y
                continue
            e = allreduce_max([rel_err(y, y_base)], None, ctx.device)[0]
            del y
            if within_tolerance(e, dtype):
                status[mode] = {"status": "ok", "rel_err": e}
            else:
                status[mode] = {"status": "failed", "rel_err": e,
                                "reason": f"rel_err {e:.3g} above the {dtype} tolerance {tol:g}"}
        del y_base

        # Timing: the modes that passed, interleaved baseline, pr, policy, nocomm in each round.
        timed = [mode for mode in modes if status[mode]["status"] == "ok"]
        rounds = max(1, min(MAX_ROUNDS, reps))
        per_round = math.ceil(reps / rounds)
        medians: dict[str, list[float]] = {mode: [] for mode in timed}
        iqrs: dict[str, list[float]] = {mode: [] for mode in timed}
        for r in range(rounds):
            for mode in timed:
                if mode not in medians:
                    continue
                info = plan[mode]
                t, err = try_case(lambda: time_region(lambda: _forward(info, weights, x, d),
                                                  warmup=warmup if r == 0 else min(warmup, 1), reps=per_round,
                                                  group=None, device=ctx.device))
                err = agree_failure(err, ctx)
                if err:
                    status[mode] = {**status[mode], "status": "failed", "reason": f"timing: {err}"}
                    medians.pop(mode)
                    _free(ctx)
                    continue
                medians[mode].append(t.median_ms)
                iqrs[mode].append(t.iqr_ms)
        del x
        _free(ctx)

        peak_gib = None
        if ctx.device.type == "cuda":
            peak_gib = allreduce_max([torch.cuda.max_memory_allocated(ctx.device) / 2**30], None, ctx.device)[0]
        t_ms = {mode: statistics.median(v) for mode, v in medians.items()}
        t_base, t_nocomm = t_ms.get("baseline", math.nan), t_ms.get("nocomm", math.nan)
        comm_share = None
        if "baseline" in t_ms and "nocomm" in t_ms:
            comm_share = (t_base - t_ms["nocomm"]) / t_base
        # The share is hideable only where it is above the spread of the two references' times.
        # At world 1 nothing is communicated: any difference is noise, so no model eta.
        noise = max(max(iqrs[k]) for k in REFERENCE_MODES) if all(t_ms.get(k) for k in REFERENCE_MODES) else 0.0
        noise = math.inf if ctx.world == 1 else noise
        for mode in modes:
            st, info = status[mode], plan[mode]
            t = t_ms.get(mode, math.nan)  # NaN unless it passed and was timed
            records.append(job.record(
                m, mode, st["status"], st.get("reason"), note=info.get("note"), rel_err=st.get("rel_err", math.nan),
                t_ms=t,
                t_iqr_ms=max(iqrs[mode]) if mode in t_ms else math.nan,
                t_base_ms=t_base, t_base_iqr_ms=max(iqrs["baseline"]) if "baseline" in t_ms else math.nan,
                tokens_per_s=metrics.tokens_per_s(m, t),
                speedup=metrics.speedup(t_base, t),
                eta=model_eta(t_base, t, t_nocomm, noise),
                extra=dict(comm_share=comm_share if mode == "baseline" else None,
                           t_nocomm_ms=t_ms.get("nocomm"), t_rounds_ms=medians.get(mode),
                           nanobatch=info.get("nanobatch"),
                           choices=info.get("choices"), choice_reasons=info.get("choice_reasons"),
                           policy_path=str(policy_path) if (mode == "policy" and policy_path) else None,
                           peak_mem_gib=peak_gib),
            ))
        if ctx.rank == 0:
            folder.write_records(records, runfolder.MODEL)
            log.info("%s tp=%d M=%d: %s", preset, tp, m,
                     ", ".join(f"{k}={v:.2f} ms" for k, v in t_ms.items()))


class _Job:
    """What every record of one model job shares, and how a record of it is made."""

    def __init__(self, preset: str, hidden: int, dtype: str, ctx: RankContext, device: str, env: dict[str, str],
                 warmup: int, reps: int, nano: nanobatch.NanoSettings, extra: dict[str, Any],
                 policy_path: str | None, shapes_tp: int | None):
        self.fields = dict(kind="model", shape=preset, K=0, N=hidden, dtype=dtype, world=ctx.world,
                           backend=ctx.backend, device=device, env=env, tol=TOLERANCE[dtype], warmup=warmup,
                           reps=reps)
        self.nano, self.extra = nano, extra
        cmd = [*(f"{k}={shlex.quote(v)}" for k, v in sorted(env.items())), "overlap-bench model", "--preset",
               preset, "--nproc", str(ctx.world), "--backend", ctx.backend, "--layers", str(extra["layers"]),
               "--dtype", dtype, "--warmup", str(warmup), "--reps", str(reps)]
        cmd += ["--shapes-tp", str(shapes_tp)] if shapes_tp else []
        cmd += ["--policy", shlex.quote(str(policy_path))] if policy_path else []
        self.command = " ".join(cmd)
        self.nano_flags = (f" --nanobatches {nano.nanobatches} --nano-comm {nano.comm} "
                           f"--nano-attention {nano.attention}" + (" --nano-priority" if nano.priority else ""))

    def record(self, m: int, mode: str, status: str, reason: str | None = None, extra: dict[str, Any] | None = None,
               **fields: Any) -> Record:
        """Mode ``mode`` at ``M = m`` with these Record ``fields``; ``extra``'s values that are not None are
        added to the job's ``extra``."""
        nano = mode.startswith("nanobatch")
        return Record(**self.fields, **fields, M=m, strategy=mode, label=mode, status=status, reason=reason,
                      settings=asdict(self.nano) if nano else {},
                      repro=f"{self.command} --tokens {m} --mode {shlex.quote(mode)}"
                            + (self.nano_flags if nano else ""),
                      time=runfolder.utc_now(),
                      extra={**self.extra, **{k: v for k, v in (extra or {}).items() if v is not None}})


def _forward(info: dict[str, Any], weights: list[LayerWeights], x: torch.Tensor, d: Dims) -> torch.Tensor:
    """One prefill forward of a planned mode: its own schedule (``forward``) or the layer loop with its ``row``."""
    if "forward" in info:
        return info["forward"](weights, x, d)
    return stack_forward(weights, x, d, info["row"])


# ---------------------------------------------------------------------------------------------- launcher

def validate(preset: str, tp: int, tokens: list[int], layers: int, dtype: str, warmup: int, reps: int,
             modes: tuple[str, ...] = MODES, nano: nanobatch.NanoSettings | None = None,
             tp_flag: str = "--tp") -> ModelPreset:
    """Check the inputs; a :class:`UserError` names the field (``tp_flag``: the flag that gave ``tp``) and the
    fix in one line."""
    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    p = PRESETS[preset]
    check.integer(tp, tp_flag, 1)
    for name in ("heads", "kv_heads", "intermediate"):
        value = getattr(p, name)
        if value % tp:
            fits = ", ".join(str(t) for t in range(1, 9) if p.heads % t == 0 and p.kv_heads % t == 0
                             and p.intermediate % t == 0)
            raise UserError(f"{tp_flag} {tp}: {preset} {name}={value} is not divisible by tp={tp}; "
                            f"use a {tp_flag} that divides heads, kv_heads and intermediate (e.g. {fits})")
    if not tokens:
        raise UserError("--tokens: give at least one token count, e.g. 8192,16384,32768")
    for t in tokens:
        check.integer(t, "--tokens", 1)
    check.integer(layers, "--layers", 1)
    if dtype not in DTYPES:
        raise UserError(f"--dtype: unknown dtype '{dtype}'; use one of {', '.join(DTYPES)}")
    check.integer(warmup, "--warmup", 0)
    check.integer(reps, "--reps", 1)
    unknown = [mode for mode in modes if mode not in MODES]
    if unknown or not modes:
        raise UserError(f"--mode: unknown mode '{unknown[0] if unknown else ''}'; use a comma-separated list of "
                        f"{', '.join(MODES)} (baseline and nocomm always run)")
    if nano is not None and any(mode.startswith("nanobatch") for mode in modes) and nano.nanobatches > min(tokens):
        raise UserError(f"--nanobatches {nano.nanobatches} is more than the smallest token count {min(tokens)}; "
                        "use --nanobatches <= every --tokens value")
    return p


def _check_policy(path: str | os.PathLike, tp: int) -> dict[str, str]:
    """Load the policy once in the launcher (bad files fail before any rank starts); its required env."""
    from overlap_bench.policy import PolicyError, load_policy

    try:
        pol = load_policy(path, expect_world=tp)
    except PolicyError as e:
        raise UserError(f"--policy: {e}") from None
    env = pol.meta.get("required_env") or {}
    if not isinstance(env, dict):
        raise UserError(f"--policy: {path}: meta.required_env must be a mapping of variables, got {env!r}")
    return {str(k): str(v) for k, v in env.items()}


def model_main(preset: str, tp_world: int | None, tokens: list[int], layers: int, policy: str | os.PathLike | None,
               dtype: str, warmup: int, reps: int, out_dir: str | os.PathLike, backend: str | None = None,
               nproc: int | None = None, *, seed: int = 0, timeout_s: float = 600.0,
               modes: tuple[str, ...] = MODES, nano: nanobatch.NanoSettings | None = None,
               shapes_tp: int | None = None) -> list[Record]:
    """Run the model benchmark as a job of ``tp`` ranks; returns its records as read back from
    ``model.jsonl`` (empty on ranks other than 0).

    ``tp_world`` is the tensor-parallel size (= ranks); None means every rank (``resolve``'s default).
    Writes ``out_dir/env.json`` before the job and ``out_dir/model.jsonl`` (rank 0, after each M); an
    existing ``model.jsonl`` there is replaced. A policy's ``meta.required_env`` is set in every rank (all
    modes then run under it); under torchrun it must already be set. ``modes`` picks the modes (baseline
    and nocomm always run); ``nano`` sets the nano-batch modes (default: 2 nano-batches, side stream);
    ``shapes_tp`` runs the per-rank shapes of a larger tensor-parallel size on these ranks (see ``run_model``).
    """
    from contextlib import nullcontext

    if preset not in PRESETS:
        raise UserError(f"--preset: unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    if tp_world is not None:
        validate(preset, tp_world, list(tokens), layers, dtype, warmup, reps, modes, nano)  # before resolve
    if tp_world is not None and nproc is not None and tp_world != nproc:
        raise UserError(f"--tp {tp_world} and --nproc {nproc} differ: the model runs one rank per tensor-parallel "
                        "shard; give one of them")
    backend, world = resolve(backend, nproc if nproc is not None else tp_world)
    if tp_world is not None and world != tp_world:
        raise UserError(f"--tp {tp_world} but the torchrun job has WORLD_SIZE={world}; start torchrun with "
                        f"--nproc-per-node {tp_world} or pass --tp {world}")
    if shapes_tp is not None and shapes_tp < world:
        raise UserError(f"--shapes-tp {shapes_tp} is less than the {world} ranks; give --shapes-tp >= {world} "
                        "or leave it out")
    tp = shapes_tp or world
    validate(preset, tp, list(tokens), layers, dtype, warmup, reps, modes, nano, "--shapes-tp" if shapes_tp else "--tp")
    env: dict[str, str] = {}
    policy_path = None
    if policy is not None:
        policy_path = str(Path(policy))
        env = _check_policy(policy_path, tp)
        if in_torchrun():
            missing = {k: v for k, v in env.items() if os.environ.get(k) != v}
            if missing:
                want = " ".join(f"{k}={v}" for k, v in missing.items())
                raise UserError(f"--policy: {policy_path} needs {want} set before CUDA starts; "
                                "set it on the torchrun command")
    rank0 = not in_torchrun() or os.environ.get("RANK", "0") == "0"
    folder = runfolder.RunFolder(out_dir)
    with folder.lock() if rank0 else nullcontext():  # one writer per folder
        if rank0:
            (folder / runfolder.MODEL).unlink(missing_ok=True)
            folder.write_env()
        args = (preset, list(tokens), layers, policy_path, warmup, reps, str(folder.path), dtype, seed,
                tuple(modes), nano, shapes_tp, env)
        launch(run_model, args, JobConfig(world, backend, timeout_s, env))
        return folder.load(runfolder.MODEL).records if rank0 else []  # rewritten atomically: never torn


# ---------------------------------------------------------------------------------------------- table

def _fmt(v: Any, spec: str) -> str:
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def model_table(records: list[Record], title: str | None = None) -> "Table":
    """A rich table, one row per (M, mode): time, tokens/s, speedup vs baseline, comm share, model eta,
    rel_err."""
    from rich.table import Table

    if title is None and records:
        r, x = records[0], records[0].extra
        ranks = f" shapes on {r.world} rank(s)" if r.world != x.get("tp", r.world) else ""
        title = (f"{r.shape} x{x.get('layers', '?')} layers, tp={x.get('tp', r.world)}{ranks} "
                 f"({r.backend}, {r.device}), {r.dtype}")
    t = Table(title=title)
    for c in ("M", "mode", "ms", "tokens/s", "speedup vs baseline", "comm share", "eta (model)", "rel_err", "notes"):
        t.add_column(c, justify="left" if c in ("mode", "notes") else "right")
    for r in records:
        notes, x = [], r.extra
        if not r.ok:
            notes.append(f"[red]{r.status}[/]: {r.reason}")
        if r.strategy in ("policy", "nanobatch+policy") and x.get("choices"):
            notes.append(", ".join(f"{k}={v}" for k, v in x["choices"].items()))
        if r.strategy == "nocomm" and r.ok:
            notes.append("no all-reduce (timing only)")
        nb = x.get("nanobatch")
        if nb and nb.get("rows"):
            notes.append(f"{nb['nanobatches']} nano-batches ({'/'.join(map(str, nb['rows']))} rows), "
                         f"comm={nb['comm']}" + (", priority" if nb.get("priority") else ""))
        share = x.get("comm_share")
        t.add_row(str(r.M), r.label, _fmt(r.t_ms, ".2f"), _fmt(r.tokens_per_s, ",.0f"), _fmt(r.speedup, ".3f"),
                  "-" if share is None else _fmt(share * 100, ".1f") + "%", _fmt(r.eta, ".2f"),
                  _fmt(r.rel_err, ".1e"), "; ".join(notes))
    return t

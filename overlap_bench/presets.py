"""Model presets: the dimensions that set a model's row-parallel shapes (gpt-fast style: a dict of names)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ModelPreset:
    """The dimensions of a decoder that matter here (from each model's published config.json)."""

    hidden: int  # N of both row-parallel layers
    intermediate: int  # MLP width: K (total) of down_proj
    heads: int  # attention heads; heads * head_dim is K (total) of o_proj
    kv_heads: int  # key/value heads (grouped-query attention)
    head_dim: int
    layers: int  # decoder layers in the full model


PRESETS: dict[str, ModelPreset] = {
    "qwen2.5-72b": ModelPreset(hidden=8192, intermediate=29568, heads=64, kv_heads=8, head_dim=128, layers=80),
    "llama-3.1-70b": ModelPreset(hidden=8192, intermediate=28672, heads=64, kv_heads=8, head_dim=128, layers=80),
    "llama-3.1-405b": ModelPreset(hidden=16384, intermediate=53248, heads=128, kv_heads=8, head_dim=128, layers=126),
    # Small enough for a CPU test of the whole path; not a real model.
    "tiny": ModelPreset(hidden=256, intermediate=512, heads=4, kv_heads=2, head_dim=64, layers=2),
}


def row_parallel_shapes(preset: str, tp: int) -> dict[str, tuple[int, int]]:
    """``{"<preset>/o_proj": (K, N), "<preset>/down_proj": (K, N)}``, K per rank at ``tp`` (it must divide K)."""
    if preset not in PRESETS:
        raise ValueError(f"unknown preset '{preset}' (known: {', '.join(PRESETS)})")
    p = PRESETS[preset]
    out = {}
    for layer, k_total in (("o_proj", p.heads * p.head_dim), ("down_proj", p.intermediate)):
        if k_total % tp:
            raise ValueError(f"{preset} {layer} K={k_total} is not divisible by tp={tp}; pick a tp that divides it")
        out[f"{preset}/{layer}"] = (k_total // tp, p.hidden)
    return out

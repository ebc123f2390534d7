"""Sweep specs: YAML in, a validated :class:`SweepSpec` out, expanded into cases; errors are one-line SpecErrors."""

from __future__ import annotations

import itertools
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any

from pydantic import (AfterValidator, BeforeValidator, Field, TypeAdapter, ValidationInfo, field_validator,
                      model_validator)

from overlap_bench import check, strategies
from overlap_bench.check import Config, Dtype, FieldError, Listed
from overlap_bench.world import LaunchError, gpu_count, in_torchrun, resolve
from overlap_bench.metrics import DTYPES
from overlap_bench.timing import REPS, WARMUP
from overlap_bench.presets import row_parallel_shapes


SpecError = FieldError  # an invalid sweep spec or flag; the message is one line: ``field: problem; fix``
MAX_CASES = 100_000  # more is a mistake (a range with step 1, a grid too fine): refused before it is built
MAX_DIM = 2 ** 31 - 1  # largest K, N or M: GEMM libraries index with 32-bit integers
CONFIRM_REPEATS = 20  # default interleaved repeats per side in a sweep's confirmation stage
MIN_CONFIRM_REPEATS = 7  # stats.fewest at the ship rule's tail (3 leaders and pr) is 6; one more for noisy machines
# The command-line flags that replace spec fields (:func:`parse_spec`): their errors name the flag.
FLAGS = {"world_size": "--nproc", "backend": "--backend", "timeout_s": "--timeout",
         "confirm_repeats": "--confirm-repeats"}
CPU_NOTE_FLOP = 1e12  # GEMM work per gloo rank from which :func:`check_memory` notes the scale (minutes on CPUs)

Dim = Annotated[int, Field(ge=1, le=MAX_DIM)]


@dataclass(frozen=True)
class Shape:
    """One row-parallel GEMM shape: K per rank (the inner dimension), N output features."""

    name: str
    K: int
    N: int


@dataclass(frozen=True)
class Case:
    """One measurement: a shape at M tokens, a dtype, a strategy with typed settings, an env variant (sorted items)."""

    shape: str
    K: int
    N: int
    M: int
    dtype: str
    bias: bool
    strategy: str
    settings: Any
    env: tuple[tuple[str, str], ...]

    @property
    def label(self) -> str:
        """Canonical strategy text, for display and keys only (``strategies.label``)."""
        return strategies.label(self.strategy, self.settings)


class PresetShape(Config):
    """YAML ``{preset, tp}``: a model's o_proj and down_proj, K per rank at ``tp`` (default: the world size)."""

    preset: str  # a model of presets.PRESETS, e.g. qwen2.5-72b
    tp: int | None = Field(None, ge=1)  # tensor-parallel size; it must divide the model's K


class ExplicitShape(Config):
    """YAML ``{name, K, N}``: K per rank; the name defaults to ``K<K>xN<N>``."""

    name: str | None = None  # shape name in tables and file names
    K: Dim  # inner dimension per rank
    N: Dim  # output features


_SHAPE_FORMS = TypeAdapter(list[Annotated[PresetShape | ExplicitShape, BeforeValidator(
    lambda v: (PresetShape if isinstance(v, dict) and "preset" in v else ExplicitShape).model_validate(v))]])


def _shapes(raw: Any, info: ValidationInfo) -> list[Shape]:
    out: list[Shape] = []
    for i, f in enumerate(_SHAPE_FORMS.validate_python(check.listed(raw))):
        try:
            pairs = {f.name or f"K{f.K}xN{f.N}": (f.K, f.N)} if isinstance(f, ExplicitShape) else \
                row_parallel_shapes(f.preset, f.tp or info.data.get("world_size") or 1)
        except ValueError as exc:
            check.fail((i,), str(exc))
        out += [Shape(n, k, nn) for n, (k, nn) in pairs.items()]
    names = [s.name for s in out]
    if len(set(names)) < len(names):
        raise ValueError(f"'{next(n for n in names if names.count(n) > 1)}' appears twice; give each a distinct name")
    return out


class TokenRange(Config):
    """YAML ``{start, stop, mul}`` (geometric) or ``{start, stop, step}`` (linear), both ends included."""

    start: Dim  # the first M
    stop: Dim  # the last M at most
    mul: int | None = Field(None, ge=2)  # each M is the previous one times this
    step: int | None = Field(None, ge=1)  # each M is the previous one plus this

    @model_validator(mode="after")
    def _one_rule(self) -> "TokenRange":
        if (self.mul is None) == (self.step is None):
            raise ValueError("give exactly one of mul (geometric) or step (linear)")
        if self.stop < self.start:
            check.fail(("stop",), f"must be >= start ({self.start}), got {self.stop}")
        if self.step and (self.stop - self.start) // self.step >= MAX_CASES:
            raise ValueError(f"{self.start}..{self.stop} by {self.step} is over {MAX_CASES} values; use a larger "
                             "step or mul")
        return self

    def values(self) -> list[int]:
        if self.step:
            return list(range(self.start, self.stop + 1, self.step))
        powers = (self.start * self.mul ** i for i in itertools.count())
        return list(itertools.takewhile(lambda m: m <= self.stop, powers))


def _strategies(raw: Any) -> list[tuple[str, Any]]:
    out: list[tuple[str, Any]] = []
    for i, item in enumerate(check.listed(raw)):
        grid = dict(item) if isinstance(item, dict) else {"name": item}
        name = grid.pop("name", None)
        if name not in strategies.names():
            check.fail((i, "name"), f"{'missing' if name is None else f'{name!r} is not a strategy'}; give one of "
                                    f"{', '.join(strategies.names())}")
        try:
            values = {key: check.listed(v) for key, v in grid.items()}
        except ValueError as exc:
            check.fail((i, next(k for k, v in grid.items() if v == [])), str(exc))
        if math.prod(map(len, values.values())) > MAX_CASES:
            check.fail((i,), f"its grid has {math.prod(map(len, values.values()))} points; give fewer values")
        for point in itertools.product(*values.values()):
            try:
                settings = strategies.make_settings(name, dict(zip(values, point)))
            except ValueError as exc:
                check.fail((i, next((k for k in values if f"'{k}'" in str(exc)), "settings")), str(exc))
            if (name, settings) not in out:  # settings compare by value: a grid point given twice runs once
                out.append((name, settings))
    return out


def _env(env: dict[str, str]) -> dict[str, str]:
    for k, v in env.items():
        if not k or "=" in k or "\0" in k + v:
            raise ValueError(f"{k!r}={v!r} cannot be set in a process environment; give a non-empty name "
                             "without '=' and no NUL characters")
    return env


def _distinct(envs: list[dict[str, str]]) -> list[dict[str, str]]:
    for i, env in enumerate(envs):  # dicts compare by items: a variant in another key order is the same one
        if env in envs[:i]:
            check.fail((i,), f"the same variables as env[{envs.index(env)}] ({env}), which would be measured "
                             "twice; give each variant once")
    return envs


# An environment value; a YAML integer (``CUDA_DEVICE_MAX_CONNECTIONS: 1``) is its text.
EnvValue = Annotated[str, BeforeValidator(lambda v: str(v) if type(v) is int else v)]


class SweepSpec(Config):
    """A sweep: every field checked and the YAML forms (presets, token ranges, strategy grids) expanded into the
    lists below; :func:`parse_spec` turns a failure into a :class:`SpecError`."""

    name: str = "sweep"  # used in file names and titles
    backend: str = Field("auto", validate_default=True)  # auto (nccl with GPUs, else gloo), nccl or gloo
    world_size: int | None = Field(None, ge=1, validate_default=True)  # ranks; default every GPU, or 2 on CPU
    dtypes: Annotated[list[Dtype], Listed] = ["bfloat16"]
    # Presets {preset, tp} (a model's o_proj and down_proj) or {name, K, N}, expanded.
    shapes: Annotated[list[Shape], BeforeValidator(_shapes)]
    # Token counts M, sorted: a list, or {start, stop, mul} / {start, stop, step}.
    tokens: Annotated[list[Dim], Listed, BeforeValidator(lambda v: TokenRange.model_validate(v).values()
                                                          if isinstance(v, dict) else v),
                      AfterValidator(lambda v: sorted(set(v)))]
    # (name, settings), one per grid point: names, or {name, setting: [values]} grids.
    strategies: Annotated[list[tuple[str, Any]], BeforeValidator(_strategies)]
    bias: bool = False  # give the layer a bias (counted once in the reduced output)
    # Process environment variants; each runs as its own job (some knobs act only before CUDA starts).
    env: Annotated[list[Annotated[dict[str, EnvValue], BeforeValidator(lambda v: {} if v is None else v),
                                  AfterValidator(_env)]], Listed, AfterValidator(_distinct)] = [{}]
    warmup: int = Field(WARMUP, ge=0)  # untimed calls before each timed region
    reps: int = Field(REPS, ge=1)  # timed calls per region (median and IQR over them)
    timeout_s: float = Field(300.0, gt=0, le=1e7)  # collective timeout: a hung rank ends the job after this long
    confirm_repeats: int = CONFIRM_REPEATS  # interleaved repeats per side in the confirmation stage

    @field_validator("backend")
    @classmethod
    def _backend(cls, v: str) -> str:
        try:
            return resolve(v, 1)[0]
        except LaunchError as exc:
            raise ValueError(str(exc).replace("--backend ", "")) from None

    @field_validator("world_size")
    @classmethod
    def _world(cls, v: int | None, info: ValidationInfo) -> int | None:
        try:
            world = resolve(info.data["backend"], v)[1] if "backend" in info.data else v
        except LaunchError as exc:
            raise ValueError(str(exc).replace("--nproc", "world_size")) from None
        if in_torchrun() and v is not None and v != world:
            raise ValueError(f"{v} differs from torchrun's WORLD_SIZE={world}; remove it or match it")
        return world

    @field_validator("confirm_repeats")
    @classmethod
    def _repeats(cls, v: int) -> int:
        if v < MIN_CONFIRM_REPEATS:
            raise ValueError(f"must be >= {MIN_CONFIRM_REPEATS}, got {v}: with fewer the confirmation cannot hold "
                             f"false ships under 1%; give {MIN_CONFIRM_REPEATS} or more (default {CONFIRM_REPEATS})")
        return v

    @model_validator(mode="after")
    def _size(self) -> "SweepSpec":
        n = math.prod(map(len, (self.env, self.dtypes, self.shapes, self.tokens, self.strategies)))
        if n > MAX_CASES:
            raise ValueError(f"{n} cases, more than {MAX_CASES}; split the sweep or give fewer values")
        return self

    def cases(self) -> list[Case]:
        """Every case, grouped by environment variant first (one job per variant)."""
        return [Case(shape.name, shape.K, shape.N, m, dtype, self.bias, name, settings, tuple(sorted(env.items())))
                for env, dtype, shape, m, (name, settings) in itertools.product(
                    self.env, self.dtypes, self.shapes, self.tokens, self.strategies)]

    @property
    def labels(self) -> list[str]:
        """The strategies as labels (display, the run folder's identity)."""
        return [strategies.label(*s) for s in self.strategies]


def check_memory(spec: SweepSpec) -> str | None:
    """On gloo (all ranks on this machine) refuse a case beyond its memory (the OOM killer ends ranks silently);
    return a note when the GEMM work is far from a quick run. Apart from :func:`parse_spec`: GPU specs validate here."""
    if spec.backend != "gloo":
        return None
    try:
        ram = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (OSError, ValueError, AttributeError):
        ram = math.inf
    for shape, m, dtype in itertools.product(spec.shapes, spec.tokens, spec.dtypes):
        size = DTYPES[dtype].itemsize
        # Per rank: float32 draws of x and w, their casts, five [M, N] outputs (reference, scratch, comm, output, temp).
        need = spec.world_size * ((4 + size) * (m + shape.N) * shape.K + 5 * size * m * shape.N)
        if need > ram:
            raise SpecError(f"tokens: M={m} with {shape.name} (K={shape.K}, N={shape.N}, {dtype}) needs about "
                            f"{need / 2**30:.1f} GiB on {spec.world_size} gloo ranks, more than this machine's "
                            f"{ram / 2**30:.1f} GiB; use fewer tokens or a smaller shape")
    cases = spec.cases()  # each times the strategy, and about as often the reference and the GEMM alone
    flop = sum(2 * c.M * c.N * c.K for c in cases) * 3 * (spec.warmup + spec.reps)
    if flop < CPU_NOTE_FLOP:
        return None
    big = max(cases, key=lambda c: c.M * c.N * c.K)
    return (f"{big.shape} (K={big.K}, N={big.N}) at M={big.M} is {2 * big.M * big.N * big.K / 1e9:.0f} GFLOP a "
            f"call; the run is about {flop / 1e12:.0f} TFLOP per gloo rank (minutes to hours on CPUs); for a small "
            "run leave out the shape flags (this machine's default: tiny float32 shapes)")


def parse_spec(raw: Any, **flags: Any) -> SweepSpec:
    """Validate a spec mapping; ``flags`` (None: not given) replace its fields, their errors naming the flag."""
    given = {k: v for k, v in flags.items() if v is not None and v != ""}
    raw = check.validate(dict, {} if raw is None else raw, "spec")
    return check.validate(SweepSpec, {**raw, **given}, "spec", {k: FLAGS[k] for k in given})


def with_tp(raw: Any, tp: int) -> dict:
    """A raw spec's copy at tensor parallel ``tp`` (preset shapes' ``tp`` and the world size; explicit K, N kept)."""
    check.integer(tp, "--tp", 1)
    out = dict(check.validate(dict, raw if raw is not None else {}, "spec"))
    shapes = out.get("shapes")
    if isinstance(shapes, list):
        out["shapes"] = [dict(s, tp=tp) if isinstance(s, dict) and "preset" in s else s for s in shapes]
    out["world_size"] = tp
    out["name"] = f"{out.get('name', SweepSpec.model_fields['name'].default)}-at-tp{tp}"
    return out


def load_spec(path: str | os.PathLike | None, **overrides: Any) -> tuple[SweepSpec, dict]:
    """A spec file (None: the default spec) validated, and its raw mapping; ``overrides``: flags and ``tp``."""
    if path is None:
        raw = default_spec_raw(overrides.get("backend"))
    elif not Path(path).is_file():
        raise SpecError(f"SPEC: no file at {path}; give the path of a sweep YAML (see sweeps/)")
    else:
        try:
            raw = check.read_yaml(Path(path))
        except FieldError as exc:
            raise SpecError(f"SPEC: {path}: {exc}; give a sweep YAML") from None
    tp = overrides.pop("tp", None)
    if tp is not None:
        raw = with_tp(raw, tp)
    return parse_spec(raw, **overrides), raw


# The embedded CPU default: seconds on gloo; mirrors sweeps/smoke.yaml.
SMOKE: dict[str, Any] = {
    "name": "smoke", "backend": "gloo", "world_size": 2, "dtypes": ["float32"],
    "shapes": [{"name": "tiny/o_proj", "K": 128, "N": 256}, {"name": "tiny/down_proj", "K": 256, "N": 256}],
    "tokens": [64, 256],
    "strategies": [{"name": "baseline"}, {"name": "pr"},
                   {"name": "chunked", "chunks": [2, 4], "comm": ["stream", "async"]}],
    "warmup": 2, "reps": 5, "timeout_s": 60,
    "confirm_repeats": 7,  # the smoke shows the stage works; gloo on a laptop confirms nothing anyway
}


def default_spec_raw(backend: str | None = None) -> dict[str, Any]:
    """This machine's default spec: the CPU smoke spec (also for ``backend`` gloo), or Qwen2.5-72B at tp = GPUs."""
    gpus = gpu_count() if (backend or "auto").lower() != "gloo" else 0
    if gpus == 0:
        return dict(SMOKE)
    return {"name": f"qwen2.5-72b-tp{gpus}", "dtypes": ["bfloat16"], "shapes": [{"preset": "qwen2.5-72b", "tp": gpus}],
            "tokens": [4096, 8192, 16384, 32768],
            "strategies": [{"name": "baseline"}, {"name": "pr"},
                           {"name": "chunked", "chunks": [2, 3, 4, 8], "comm": ["stream", "async"]}]}

"""Validation equals execution. Whatever a spec, a CLI strategy string or a policy file
passes validation with runs on gloo and matches the baseline; the drop-in layer never raises for a policy
that loaded (hypothesis property tests, every registered strategy, its settings drawn by their types)."""

from __future__ import annotations

import dataclasses
import logging
import math

import pytest
import torch
import torch.distributed as dist
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from overlap_bench import strategies
from overlap_bench.bench import BenchOptions, measure_group
from overlap_bench.launch import JobConfig, RankContext, launch
from overlap_bench.layer import RowParallelLinear
from overlap_bench.metrics import TOLERANCE
from overlap_bench.policy import PolicyError, load_policy
from overlap_bench.records import load_records
from overlap_bench.spec import SpecError, parse_spec
from overlap_bench.strategies.pipeline import COMM_PATHS, SPLITS, even_bounds

strategies.get("baseline")  # load the registry
NAMES = sorted(strategies.REGISTRY)
HUGE = 10 ** 400  # a YAML integer no float holds


def _values_for(f: dataclasses.Field) -> st.SearchStrategy:
    """Values a careless user might give a setting of this type: in range, out of range, the wrong type."""
    kind = f.type.removeprefix("Annotated[").split(",")[0] if isinstance(f.type, str) else f.type.__name__
    junk = st.one_of(st.none(), st.text(max_size=4), st.lists(st.integers(), max_size=2), st.just({"a": 1}))
    if kind == "int":
        return st.one_of(st.integers(-2, 70), st.just(HUGE), st.booleans(), st.floats(0, 5), junk)
    if kind == "float":
        return st.one_of(st.floats(-2, 40), st.floats(1e-300, 1e300), st.just(1e308), st.just(HUGE),
                         st.sampled_from([math.inf, math.nan, -0.0, 1e-320]), st.integers(-1, 1000), junk)
    if kind == "bool":
        return st.one_of(st.booleans(), st.sampled_from(["true", "off", "2"]), junk)
    known = {"comm": list(COMM_PATHS), "split": list(SPLITS)}.get(f.name, [])
    return st.one_of(st.sampled_from(known) if known else st.text(max_size=6), st.integers(0, 3), junk)


@st.composite
def setting_dicts(draw) -> tuple[str, dict]:
    """A registered strategy and a dict of settings for it (some valid, many not)."""
    name = draw(st.sampled_from(NAMES))
    fields = dataclasses.fields(strategies.get(name).settings_cls)
    out = {}
    for f in fields:
        if draw(st.booleans()):
            out[f.name] = draw(_values_for(f))
    if fields and draw(st.integers(0, 9)) == 0:
        out["no_such_setting"] = 1
    return name, out


# ------------------------------------------------------------------------------ in-process gloo, one rank


@pytest.fixture(scope="module")
def gloo1():
    """A one-rank gloo process group in this process (its all-reduce is real, over one rank)."""
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield RankContext(0, 1, 0, "gloo", torch.device("cpu"))
    dist.destroy_process_group()


def _accepted_spec(name: str, values: dict, tokens: list[int]) -> object | None:
    raw = {"backend": "gloo", "world_size": 1, "dtypes": ["float32"], "shapes": [{"name": "t", "K": 8, "N": 12}],
           "tokens": tokens, "strategies": ["baseline", {"name": name, **values}], "warmup": 0, "reps": 1,
           "bias": True}
    try:
        return parse_spec(raw)
    except SpecError as e:
        assert "\n" not in str(e)
        return None


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=setting_dicts(), tokens=st.lists(st.integers(1, 70), min_size=1, max_size=2, unique=True))
def test_any_spec_that_validates_measures_on_gloo(gloo1, tmp_path_factory, drawn, tokens):
    spec = _accepted_spec(*drawn, tokens)
    if spec is None:
        return
    out = tmp_path_factory.mktemp("m")
    opts = BenchOptions(str(out), 0, 1, 0, 0, 0, False)
    cases = spec.cases()
    for m in spec.tokens:  # one (shape, M) group at a time, as a sweep job runs them; must not raise
        measure_group(gloo1, [c for c in cases if c.M == m], opts, "cpu", None)
    recs = load_records(out).records
    assert len(recs) == len(cases)
    for r in recs:
        assert r.status in ("ok", "failed", "unavailable"), r
        if r.ok:
            assert r.rel_err <= TOLERANCE["float32"]
        elif r.status == "failed":  # a case that cannot apply to its M is recorded, not a crash
            assert r.reason and "\n" not in r.reason


def _policy_doc(name: str, values: dict, bucket: int, K: int, N: int, world: int) -> dict:
    return {"meta": {"device": "cpu", "world_size": world, "dtype": "float32"},
            "shapes": {f"{K},{N}": {"buckets": {bucket: {"strategy": name, "settings": values}}}}}


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(drawn=setting_dicts(), bucket=st.integers(1, 40), m=st.integers(0, 60), fallback=st.booleans())
def test_any_policy_that_loads_serves_and_matches_baseline(gloo1, tmp_path_factory, drawn, bucket, m, fallback):
    path = tmp_path_factory.mktemp("p") / "policy.yaml"
    path.write_text(yaml.safe_dump(_policy_doc(*drawn, bucket, 8, 12, 1)))
    try:
        pol = load_policy(path, expect_world=1, fallback=fallback)
    except PolicyError as e:
        assert not fallback and "\n" not in str(e)
        return
    torch.manual_seed(m)
    layer = RowParallelLinear(8, 12, bias=True, policy=pol)
    x = torch.randn(m, 8)
    y = layer(x)  # never raises for a policy that loaded
    torch.testing.assert_close(y, torch.nn.functional.linear(x, layer.weight, layer.bias))


def test_a_bucket_with_more_chunks_than_rows_falls_back_once_with_a_warning(gloo1, tmp_path, caplog):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_policy_doc("chunked", {"chunks": 8}, 1, 8, 12, 1)))
    layer = RowParallelLinear(8, 12, policy=load_policy(path))
    with caplog.at_level(logging.WARNING, logger="overlap_bench.layer"):
        for m in (3, 5, 5):
            x = torch.randn(m, 8)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
            assert layer.last_choice.strategy == "baseline" and "cannot run for M=" in layer.last_choice.reason
    assert caplog.text.count("chunked:chunks=8,comm=stream") == 1 and "(warned once)" in caplog.text
    layer(torch.randn(9, 8))
    assert layer.last_choice.label == "chunked:chunks=8,comm=stream"  # used where it applies


def test_priority_bucket_on_gloo_falls_back_instead_of_raising(gloo1, tmp_path):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_policy_doc("chunked", {"chunks": 2, "priority": True}, 1, 8, 12, 1)))
    layer = RowParallelLinear(8, 12, policy=load_policy(path))
    x = torch.randn(6, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert "NCCL" in layer.last_choice.reason


# ------------------------------------------------------------------------------ the cases of the issue


@pytest.mark.parametrize("ratio", [1e300, 1e-300, 1e308, 7.0, 0.35])
@pytest.mark.parametrize("chunks", [2, 5, 40])
def test_geo_bounds_never_overflow_and_cover_every_row(ratio, chunks):
    for m in (40, 1000, 32768):
        b = even_bounds(m, chunks, 1, "geo", ratio)
        assert b[0][0] == 0 and b[-1][1] == m and all(s < e for s, e in b)
        assert all(e == s2 for (_, e), (s2, _) in zip(b, b[1:]))


def test_geo_bounds_at_usual_ratios_are_those_of_the_plain_powers():
    # The overflow-safe form (weights relative to the largest chunk) keeps the measured schedules' edges.
    for ratio in (1.4, 2.0, 0.35, 0.7, 1.1):
        for chunks in (2, 3, 4, 8):
            for m in range(chunks, 4100, 37):
                w = [ratio ** i for i in range(chunks)]
                cum = [sum(w[:i]) / sum(w) for i in range(chunks + 1)]
                edges = [0] + [int(m * cum[i] + 1e-9) for i in range(1, chunks)] + [m]
                plain = [(s, e) for s, e in zip(edges, edges[1:]) if e > s]
                assert even_bounds(m, chunks, 1, "geo", ratio) == plain, (ratio, chunks, m)


@pytest.mark.parametrize("text", ["chunked:ratio=1e400,split=geo", "chunked:ratio=inf", "chunked:ratio=nan",
                                  "chunked:ratio=-1"])
def test_cli_strategy_strings_out_of_range_are_refused(text):
    with pytest.raises(ValueError, match="ratio"):
        strategies.parse(text)


@pytest.mark.parametrize("settings_", [{"ratio": [1]}, {"ratio": True}, {"ratio": HUGE}, {"ratio": "x"},
                                       {"comm": 5}, {"comm": ["stream"]}, {"chunks": 2.5}, {"chunks": "two"},
                                       {"priority": "maybe"}, {"split": None}])
@pytest.mark.parametrize("fallback", [False, True])
def test_policy_settings_of_the_wrong_type_fail_at_load(tmp_path, caplog, settings_, fallback):
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(_policy_doc("chunked", settings_, 1, 8, 12, 1)))
    if not fallback:
        with pytest.raises(PolicyError, match=f"{path}.*settings"):
            load_policy(path)
        return
    with caplog.at_level(logging.WARNING, logger="overlap_bench.policy"):
        assert load_policy(path, fallback=True).choose(K=8, N=12, M=9).strategy == "baseline"
    assert "settings" in caplog.text


# ------------------------------------------------------------------------------ two ranks, one job


def _layer_batch(ctx: RankContext, docs: list[tuple[dict, int]], folder: str) -> None:
    """Each policy doc at its M on this rank's shard; every output must equal the full product."""
    from pathlib import Path

    for i, (doc, m) in enumerate(docs):
        pol = load_policy(Path(folder, f"{i}.yaml"), expect_world=ctx.world)
        g = torch.Generator().manual_seed(i)
        w_full, b, x_full = torch.randn(12, 8 * ctx.world, generator=g), torch.randn(12, generator=g), \
            torch.randn(m, 8 * ctx.world, generator=g)
        shard = slice(ctx.rank * 8, (ctx.rank + 1) * 8)
        layer = RowParallelLinear.from_weight(w_full[:, shard].contiguous(), b, policy=pol)
        y = layer(x_full[:, shard].contiguous())
        torch.testing.assert_close(y, x_full @ w_full.T + b, rtol=1e-4, atol=1e-4)


@settings(max_examples=1, deadline=None, phases=[Phase.generate], database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(batch=st.lists(st.tuples(setting_dicts(), st.integers(1, 40), st.integers(1, 60)), min_size=40, max_size=40))
def test_policies_that_load_serve_on_two_gloo_ranks(tmp_path, batch):
    docs = []
    for (name, values), bucket, m in batch:
        doc = _policy_doc(name, values, bucket, 8, 12, 2)
        path = tmp_path / "candidate.yaml"
        path.write_text(yaml.safe_dump(doc))
        try:
            load_policy(path, expect_world=2)
        except PolicyError:
            continue
        path.rename(tmp_path / f"{len(docs)}.yaml")
        docs.append((doc, m))
    assert docs, "no policy of the batch loaded"
    launch(_layer_batch, (docs, str(tmp_path)), JobConfig(nproc=2, backend="gloo", timeout_s=60))


# ------------------------------------------------------------------------------ sizes the machine cannot hold


def test_sizes_beyond_the_machine_are_refused_before_anything_starts(tmp_path):
    from typer.testing import CliRunner

    from overlap_bench.cli import app
    from overlap_bench.spec import check_memory

    base = {"backend": "gloo", "world_size": 2, "dtypes": ["float32"], "strategies": ["baseline"]}
    big = parse_spec({**base, "shapes": [{"name": "s", "K": 4096, "N": 4096}], "tokens": [64, 100_000_000]})
    with pytest.raises(SpecError, match=r"tokens: M=100000000 .* GiB on 2 gloo ranks, more than this machine"):
        check_memory(big)
    for args in (["run", "--shape", "4096,4096", "--tokens", "100000000", "--backend", "gloo", "--out", tmp_path],
                 ["compare", "baseline", "pr", "--tokens", "100000000", "--backend", "gloo"]):
        res = CliRunner().invoke(app, [str(a) for a in args])
        assert res.exit_code == 2 and "more than this machine" in res.output, (res.output, res.exception)
    assert not (tmp_path / "records.jsonl").exists()
    for raw, field in [({"shapes": [{"K": 2 ** 31, "N": 8}], "tokens": [4]}, "shapes[0].K"),
                       ({"shapes": [{"K": 8, "N": HUGE}], "tokens": [4]}, "shapes[0].N"),
                       ({"shapes": [{"K": 8, "N": 8}], "tokens": [2 ** 40]}, "tokens[0]")]:
        with pytest.raises(SpecError, match=field.replace("[", r"\[").replace("]", r"\]") + ": must be <="):
            parse_spec({**base, **raw})


def test_an_allocation_failure_is_a_recorded_case_not_a_crash():
    from overlap_bench.bench import try_case

    def alloc():
        raise RuntimeError("[enforce fail at alloc_cpu.cpp:117] DefaultCPUAllocator: can't allocate memory: "
                           "you tried to allocate 10000000000000 bytes")

    value, why = try_case(alloc)
    assert value is None and why.startswith("RuntimeError: [enforce fail") and "\n" not in why

    def bug():
        raise RuntimeError("a bug, not the machine")

    with pytest.raises(RuntimeError, match="a bug"):
        try_case(bug)

"""The nano-batch schedule: exact chunked-prefill attention, the order of its operations, every
row-parallel all-reduce issued exactly once per nano-batch and layer (seen by a counting hook on the real
collective), outputs equal to the baseline's for 1, 2 and 3 nano-batches and uneven token counts, and the
model-level eta."""

import json
import math

import pytest
import torch
import torch.distributed as dist

from overlap_bench import metrics, strategies
from overlap_bench.errors import UserError
from overlap_bench.launch import JobConfig, launch
from overlap_bench.metrics import rel_err
from overlap_bench.policy import Choice
from overlap_bench.presets import PRESETS
from overlap_bench.research import decoder, model, nanobatch

LAYERS = 2
CASES = [(24, 1), (24, 2), (37, 2), (37, 3), (5, 3)]
"""(tokens, nano-batches): 37 and 5 do not divide evenly into 2 or 3."""
CHUNKED_O = "chunked:chunks=2,comm=async"
"""nanobatch+policy stand-in: o_proj split in two chunks inside each nano-batch, down_proj one range."""


@pytest.mark.parametrize("attend", [decoder.attention, decoder.split_attention], ids=["lower-right", "split"])
def test_chunked_attention_equals_whole_sequence(attend):
    """Token ranges attending to the earlier ranges' keys/values give the whole-sequence attention (a
    top-left causal mask, the SDPA default for Lq < Lk, would let early queries miss their own keys; a
    log-sum-exp merge with a wrong base or sign would weight the two parts wrongly)."""
    p = PRESETS["tiny"]
    d = decoder.Dims.of(p, 2)
    kw = dict(dtype=torch.float64, device=torch.device("cpu"), seed=5)
    w = decoder.build_layer(p, 2, 1, 0, **kw)
    x = decoder.hidden_states(29, p.hidden, **kw)
    whole = decoder.attention_input(w, x, d)
    kv = torch.full((29, 2 * d.kv_heads * d.head_dim), float("nan"), dtype=torch.float64)
    parts = [decoder.attention_input(w, x[s:e], d, kv=kv, start=s, attend=attend)
             for s, e in [(0, 7), (7, 8), (8, 20), (20, 29)]]
    torch.testing.assert_close(torch.cat(parts), whole, rtol=1e-12, atol=1e-12)
    assert not kv.isnan().any()  # every row's keys and values were written once


class _CountedWork:
    """A work handle that logs when it is waited for (an early, hidden wait would serialize the schedule)."""

    def __init__(self, work, rows, trace):
        self.work, self.rows, self.trace = work, rows, trace

    def wait(self):
        self.trace.append(("work_wait", self.rows))
        return self.work.wait()


def _ranks(ctx, out_path):
    """Every rank: baseline vs nanobatch forwards, with a counting hook on dist.all_reduce."""
    p = PRESETS["tiny"]
    d = decoder.Dims.of(p, ctx.world)
    kw = dict(dtype=torch.float32, device=ctx.device, seed=11)
    weights = decoder.build_stack(p, ctx.world, ctx.rank, LAYERS, **kw)
    base_row = model.strategy_row({layer: ("baseline", strategies.make_settings("baseline"))
                                   for layer in decoder.ROW_LAYERS})
    chunked = strategies.parse(CHUNKED_O)
    policy_split = nanobatch.strategy_split(  # a policy's answer: chunks only where there are rows for them
        lambda layer, rows: chunked if (layer == "o_proj" and rows >= 2) else
        ("baseline", strategies.make_settings("baseline")))
    real = dist.all_reduce
    results = []
    for m, n in CASES:
        x = decoder.hidden_states(m, p.hidden, **kw)
        y_base = decoder.stack_forward(weights, x, d, base_row)
        for label, split, nano in (("nanobatch", nanobatch.baseline_split, nanobatch.NanoSettings(n)),
                                   ("nanobatch-async", nanobatch.baseline_split,
                                    nanobatch.NanoSettings(n, "async", attention="lower-right")),
                                   ("nanobatch+policy", policy_split, nanobatch.NanoSettings(n))):
            trace: list = []

            def counting(tensor, *args, **kwargs):
                rows = tensor.shape[0]
                trace.append(("all_reduce", rows))
                work = real(tensor, *args, **kwargs)
                return None if work is None else _CountedWork(work, rows, trace)

            dist.all_reduce = counting
            try:
                x_before = x.clone()
                y = nanobatch.nanobatch_forward(weights, x, d, nano, split, trace=trace)
            finally:
                dist.all_reduce = real
            results.append({"m": m, "n": n, "label": label, "trace": trace, "rel_err": rel_err(y, y_base),
                            "x_unchanged": bool(torch.equal(x, x_before)), "shape": list(y.shape)})
    if ctx.rank == 0:
        with open(out_path, "w") as fh:
            json.dump(results, fh)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    out = tmp_path_factory.mktemp("nb") / "results.json"
    launch(_ranks, (str(out),), JobConfig(nproc=2, backend="gloo", timeout_s=120))
    return json.loads(out.read_text())


def test_outputs_equal_baseline_for_1_2_3_nanobatches_and_uneven_tokens(runs):
    assert {(r["m"], r["n"]) for r in runs} == set(CASES)
    for r in runs:
        assert r["shape"] == [r["m"], PRESETS["tiny"].hidden]
        assert r["rel_err"] <= 1e-5, r  # float32 tolerance
        assert r["x_unchanged"], r


def _events(trace, hook=True):
    """The trace's events; without the hook's own (``all_reduce``, ``work_wait``) when ``hook`` is False."""
    return [tuple(e) for e in trace if hook or e[0] not in ("all_reduce", "work_wait")]


def test_every_all_reduce_issued_exactly_once_per_nanobatch_and_layer(runs):
    """The counting hook sees each nano-batch's all-reduces right after its issue and nowhere else, their
    rows add up to the nano-batch's rows, and each issue is waited for exactly once."""
    for r in runs:
        bounds = nanobatch.nano_bounds(r["m"], r["n"])
        ev = _events(r["trace"])
        issues = [e for e in ev if e[0] == "issue"]
        want = {(name, li, i) for name in decoder.ROW_LAYERS for li in range(LAYERS) for i in range(len(bounds))}
        assert sorted(e[1:] for e in issues) == sorted(want), r["label"]
        waits = [e[1:] for e in ev if e[0] == "wait"]
        assert sorted(waits) == sorted(want), r["label"]
        current = waiting = None
        rows: dict = {}
        counts: dict = {}
        waited: dict = {}
        for e in ev:
            if e[0] == "issue":
                current, waiting = e[1:], None
            elif e[0] == "wait":
                current, waiting = None, e[1:]
            elif e[0] == "all_reduce":
                assert current is not None, f"{r['label']}: an all-reduce outside any issue"
                rows[current] = rows.get(current, 0) + e[1]
                counts[current] = counts.get(current, 0) + 1
            elif e[0] == "work_wait":
                assert waiting is not None, f"{r['label']}: a work handle waited for outside the schedule's wait"
                waited[waiting] = waited.get(waiting, 0) + e[1]
            else:
                current = waiting = None
        for name, li, i in want:
            s, e = bounds[i]
            assert rows[name, li, i] == e - s, (r["label"], name, li, i)
            chunks = 2 if (r["label"] == "nanobatch+policy" and name == "o_proj" and e - s >= 2) else 1
            assert counts[name, li, i] == chunks, (r["label"], name, li, i)
            assert waited[name, li, i] == e - s, (r["label"], name, li, i)  # gloo: every path is work handles
        assert sum(counts.values()) == sum(e[0] == "all_reduce" for e in ev)


def test_two_nanobatch_schedule_order(runs):
    """The exact order for 2 nano-batches: each all-reduce issued before the other nano-batch's compute,
    waited for only just before its consumer."""
    r = next(r for r in runs if (r["m"], r["n"], r["label"]) == (24, 2, "nanobatch"))
    got = _events(r["trace"], hook=False)
    want = []
    for li in range(LAYERS):
        for i in range(2):
            if li:
                want.append(("wait", "down_proj", li - 1, i))
            want += [("attn", li, i), ("issue", "o_proj", li, i)]
        for i in range(2):
            want += [("wait", "o_proj", li, i), ("mlp", li, i), ("issue", "down_proj", li, i)]
    want += [("wait", "down_proj", LAYERS - 1, 0), ("wait", "down_proj", LAYERS - 1, 1)]
    assert got == want


def test_every_all_reduce_but_the_last_has_other_compute_behind_it(runs):
    """Between the issue and the wait of each all-reduce some other nano-batch computes (the overlap), except
    the stack's last down_proj all-reduce; consumers come after their waits; attention of a range comes after
    the earlier ranges' (their keys and values)."""
    for r in (r for r in runs if r["n"] > 1):
        ev = _events(r["trace"], hook=False)
        pos = {e: k for k, e in enumerate(ev)}
        n = len(nanobatch.nano_bounds(r["m"], r["n"]))
        for name in decoder.ROW_LAYERS:
            for li in range(LAYERS):
                for i in range(n):
                    a, b = pos["issue", name, li, i], pos["wait", name, li, i]
                    between = [e for e in ev[a + 1:b] if e[0] in ("attn", "mlp") and e[-1] != i]
                    last = (name, li, i) == ("down_proj", LAYERS - 1, n - 1)
                    assert bool(between) != last, (r["label"], name, li, i)
                    if name == "o_proj":
                        assert pos["mlp", li, i] > b
                    elif li + 1 < LAYERS:
                        assert pos["attn", li + 1, i] > b
                    if i:
                        assert pos["attn", li, i] > pos["attn", li, i - 1]


def test_model_eta_formula():
    assert metrics.model_eta(10.0, 10.0, 8.0) == 0.0
    assert metrics.model_eta(10.0, 8.0, 8.0) == 1.0
    assert metrics.model_eta(10.0, 9.5, 8.0) == pytest.approx(0.25)
    assert metrics.model_eta(10.0, 11.0, 8.0) == pytest.approx(-0.5)
    assert math.isnan(metrics.model_eta(10.0, 9.0, 10.0))       # no communication to hide
    assert math.isnan(metrics.model_eta(10.0, 9.0, 9.9, 0.2))   # share within the spread: not measurable


def test_model_runs_nanobatch_modes_and_reports_eta(tmp_path):
    from tests.test_model import _policy_file

    nano = nanobatch.NanoSettings(3, "async")
    records = model.model_main("tiny", 2, [50], 1, _policy_file(tmp_path), "float32", 0, 2, tmp_path / "run",
                               backend="gloo", modes=("nanobatch", "nanobatch+policy"), nano=nano)
    by = {r.strategy: r for r in records}
    assert list(by) == ["baseline", "nanobatch", "nanobatch+policy", "nocomm"]
    for mode in ("nanobatch", "nanobatch+policy"):
        r = by[mode]
        assert r.status == "ok" and r.rel_err <= 1e-5, r
        assert r.settings == {"nanobatches": 3, "comm": "async", "priority": False, "attention": "split"}
        assert r.extra["nanobatch"] == {**r.settings, "rows": [16, 17, 17]}
        assert "--nanobatches 3 --nano-comm async --nano-attention split" in r.repro
        t_b, t_n = by["baseline"].t_ms, by["nocomm"].t_ms
        want = metrics.model_eta(t_b, r.t_ms, t_n, max(by["baseline"].t_iqr_ms, by["nocomm"].t_iqr_ms))
        assert r.eta == want or (math.isnan(r.eta) and math.isnan(want))
    assert by["nanobatch+policy"].extra["choices"]["o_proj"] == "chunked:chunks=3,comm=stream"
    assert "nanobatch" not in by["baseline"].extra and by["baseline"].settings == {}


def test_one_rank_with_tp2_shapes_measures_the_schedule_alone(tmp_path):
    """--shapes-tp: one rank runs tp=2 per-rank shapes; the modes still match baseline, no model eta at world 1."""
    records = model.model_main("tiny", None, [19], 2, None, "float32", 0, 1, tmp_path, backend="gloo", nproc=1,
                               modes=("nanobatch",), nano=nanobatch.NanoSettings(2), shapes_tp=2)
    by = {r.strategy: r for r in records}
    assert by["nanobatch"].status == "ok" and by["nanobatch"].rel_err <= 1e-5
    assert all((r.extra["tp"], r.world) == (2, 1) for r in records)
    assert all("--nproc 1" in r.repro and "--shapes-tp 2" in r.repro for r in records)
    assert by["nanobatch"].extra["shapes"] == {"o_proj": [128, 256], "down_proj": [256, 256]}
    assert all(math.isnan(r.eta) for r in records)
    with pytest.raises(UserError, match="--shapes-tp 1 is less than the 2 ranks"):
        model.model_main("tiny", 2, [19], 1, None, "float32", 0, 1, tmp_path, backend="gloo", shapes_tp=1)


def test_strategy_without_row_split_is_unavailable_inside_nanobatches(monkeypatch):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class NoSettings:
        pass

    strategies.get("baseline")
    monkeypatch.setitem(strategies.REGISTRY, "fused", strategies.Strategy("fused", lambda *a: None, NoSettings, "x"))
    plans = nanobatch.mode_plans(nanobatch.NanoSettings(2), 40, "gloo",
                                 lambda layer, rows: Choice("fused", NoSettings(), None, "test"))
    assert "fused" in plans["nanobatch+policy"]["unavailable"]
    assert "no row split" in plans["nanobatch+policy"]["unavailable"]
    assert "unavailable" not in plans["nanobatch"]
    with pytest.raises(strategies.StrategyUnavailable, match="no row split"):
        nanobatch.strategy_split(lambda layer, rows: ("fused", NoSettings()))("o_proj", 8)


def test_bad_nanobatch_inputs_are_user_errors():
    with pytest.raises(UserError, match="--nanobatches 9 is more than the smallest token count 8"):
        model.validate("tiny", 2, [8, 64], 1, "float32", 0, 1, ("nanobatch",), nanobatch.NanoSettings(9))
    with pytest.raises(UserError, match="--mode: unknown mode 'nano'"):
        model.validate("tiny", 2, [8], 1, "float32", 0, 1, ("nano",))
    with pytest.raises(ValueError, match="nanobatches must be an integer >= 1"):
        nanobatch.NanoSettings(0)
    with pytest.raises(ValueError, match="comm must be one of stream, async"):
        nanobatch.NanoSettings(2, "ring")
    with pytest.raises(ValueError, match="attention must be one of split, lower-right"):
        nanobatch.NanoSettings(2, attention="flash")


def test_cli_bad_nano_setting_is_one_line_exit_2():
    from typer.testing import CliRunner

    from overlap_bench.cli import app

    res = CliRunner().invoke(app, ["model", "--preset", "tiny", "--nano-attention", "flash", "--backend", "gloo"])
    assert res.exit_code == 2, res.output
    assert "--nano-attention" in res.output and "Traceback" not in res.output


@pytest.mark.parametrize("comm", ["symm", "ce"])
def test_window_paths_are_refused_for_the_schedules_own_reductions(comm):
    # They need the output in a registered window, which only the chunked strategy allocates: accepted here they
    # would run as the plain stream path while the record said symm/ce.
    from typer.testing import CliRunner

    from overlap_bench.cli import app

    with pytest.raises(ValueError, match="comm must be one of stream, async"):
        nanobatch.NanoSettings(comm=comm)
    res = CliRunner().invoke(app, ["model", "--nano-comm", comm, "--nproc", "2", "--backend", "gloo"])
    assert res.exit_code == 2 and "--nano-comm" in res.output

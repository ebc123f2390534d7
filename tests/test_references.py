"""The plain all-reduce references (``baseline:comm=symm/oneshot/twoshot``) on CPU: their settings and listing,
why each is unavailable on gloo (also at call time), the numbers against the best plain all-reduce worked out by
hand, a reference confirmed, exported, loaded and served by the drop-in layer."""

from __future__ import annotations

import dataclasses
import logging
import math

import matplotlib
import pytest
import torch
import torch.distributed as dist
import yaml
from typer.testing import CliRunner

from overlap_bench import confirm, export, metrics, plots, policy, report, select, strategies
from overlap_bench.bench import check_against_baseline
from overlap_bench.cli import app
from overlap_bench.launch import RankContext
from overlap_bench.layer import RowParallelLinear
from overlap_bench.records import CONFIRM, Record
from overlap_bench.runfolder import RunFolder
from overlap_bench.spec import SpecError, load_spec, parse_spec
from overlap_bench.strategies.baseline import BaselineSettings, symm_mem_reason
from overlap_bench.sweep import plan_stage

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

approx = pytest.approx
OVER = "chunked:chunks=2,comm=stream"  # an overlap setting (its label shows its comm)
REFS = ["baseline:comm=symm", "baseline:comm=oneshot", "baseline:comm=twoshot"]


def rec(M, label, t, *, t_gemm=0.5, t_comm=0.6, iqr=0.0, status="ok", world=2, **kw):
    """A first-pass record of bucket (s, 64, 64, M), the reference measured beside it at 1.0 ms."""
    name, settings = strategies.parse(label)
    return Record(shape="s", K=64, N=64, M=M, dtype="float32", world=world, backend="nccl", device="gpu",
                  strategy=name, settings=strategies.settings_dict(settings), label=strategies.label(name, settings),
                  env={}, status=status, t_ms=t if status == "ok" else math.nan, t_iqr_ms=iqr, t_base_ms=1.0,
                  t_base_iqr_ms=0.0, t_gemm_ms=t_gemm, t_comm_ms=t_comm, rel_err=0.0, **kw)


# ---- settings, listing, availability --------------------------------------------------------------------------

def test_references_are_settings_of_the_baseline_listed_from_their_type():
    out = CliRunner().invoke(app, ["strategies"], terminal_width=300).output
    assert "nccl, symm, oneshot, twoshot" in out
    assert strategies.label("baseline", strategies.make_settings("baseline")) == "baseline"  # THE reference
    for text in REFS:
        name, s = strategies.parse(text)
        assert name == "baseline" and strategies.label(name, s) == text and s.comm == text.split("=")[1]
        assert not metrics.is_reference(text) and metrics.is_plain(name)
    with pytest.raises(ValueError, match="'comm'"):
        strategies.parse("baseline:comm=multimem")  # no multicast path
    bad = {"backend": "gloo", "world_size": 2, "shapes": [{"name": "t", "K": 8, "N": 8}], "tokens": [4],
           "strategies": [{"name": "baseline", "comm": ["ring"]}]}
    with pytest.raises(SpecError, match=r"^strategies\[0\]\.comm: .*'oneshot' or 'twoshot', got 'ring'$"):
        parse_spec(bad)


@pytest.mark.parametrize("text", REFS)
def test_each_reference_is_unavailable_on_gloo_in_one_line(text):
    why = strategies.unavailable_reason(*strategies.parse(text), "gloo")
    assert why and "gloo" in why and "\n" not in why and text.split(":")[1] in why
    with pytest.raises(strategies.StrategyUnavailable, match="no plain row split"):
        strategies.get("baseline").split(64, strategies.parse(text)[1])


def test_torch_kernel_limits_are_named():
    assert symm_mem_reason("oneshot", 4, 8, torch.bfloat16) is None
    assert symm_mem_reason("twoshot", 3, 3, torch.float32) is None
    assert "float16" in symm_mem_reason("oneshot", 4, 8, torch.float16)
    assert "4 bytes" in symm_mem_reason("twoshot", 3, 3, torch.bfloat16)  # 9 bf16 elements: 18 bytes


def test_unavailable_at_call_time_is_recorded_unavailable(monkeypatch):
    """A strategy that finds out only when called (dtype, size) that it cannot take a case: unavailable, its
    reason kept, not a failure."""
    def refuse(*args):
        raise strategies.StrategyUnavailable("comm=oneshot: takes bfloat16 or float32, not float16")

    monkeypatch.setitem(strategies.REGISTRY, "baseline",
                        dataclasses.replace(strategies.get("baseline"), fn=refuse, check=None))
    ctx = RankContext(0, 1, 0, "gloo", torch.device("cpu"))
    x = torch.ones(2, 2)
    got = check_against_baseline("baseline", BaselineSettings("oneshot"), x, x, None, x, "float16", ctx)
    assert (got.status, got.reason) == ("unavailable", "comm=oneshot: takes bfloat16 or float32, not float16")


def test_tp4_specs_hold_the_references():
    for name in ("", "-sm-light", "-eta", "-levers"):
        spec, _ = load_spec(f"sweeps/qwen2.5-72b-tp4{name}.yaml", backend="gloo")
        assert {"baseline:comm=oneshot", "baseline:comm=twoshot"} <= set(spec.labels), name
        if "baseline:comm=symm" in spec.labels:  # NCCL's symmetric kernel needs its backend in a variant
            assert any(e.get("TORCH_SYMMMEM") == "NCCL" for e in spec.env) and {} in spec.env


# ---- vs best plain, by hand --------------------------------------------------------------------------------------

def bucket_records():
    """M=1024: nothing beats the ring; M=2048: one-shot does; M=4096: overlap does, and beats one-shot too."""
    return [rec(1024, "baseline", 1.0), rec(1024, "baseline:comm=oneshot", 1.05), rec(1024, OVER, 1.1),
            rec(2048, "baseline", 1.0), rec(2048, "baseline:comm=oneshot", 0.625), rec(2048, OVER, 0.7),
            rec(2048, "baseline:comm=twoshot", status="unavailable", t=0.0, reason="gloo"),
            rec(4096, "baseline", 1.0), rec(4096, "baseline:comm=oneshot", 0.8),
            rec(4096, "baseline:comm=twoshot", 0.9), rec(4096, OVER, 0.7)]


def test_vs_best_plain_by_hand():
    best = {b.M: b for b in select.best(bucket_records())}
    b = best[4096]  # ideal = max(0.5, 0.6) = 0.6; t_plain = one-shot's 0.8
    assert (b.label, b.t_plain_ms, b.plain) == (OVER, 0.8, "baseline:comm=oneshot")
    assert b.speedup == approx(1.0 / 0.7) and b.speedup_plain == approx(0.8 / 0.7)
    assert b.eta == approx((1.0 - 0.7) / (1.0 - 0.6)) and b.eta_plain == approx((0.8 - 0.7) / (0.8 - 0.6))
    assert b.vs_plain["baseline:comm=twoshot"][0] == approx(0.8 / 0.9)
    b = best[2048]  # the fastest is a plain reference: it wins as any setting would, 1.6x, and is the best plain
    assert (b.strategy, b.settings, b.label) == ("baseline", {"comm": "oneshot"}, "baseline:comm=oneshot")
    assert b.speedup == approx(1.6) and b.speedup_plain == approx(1.0) and b.plain == b.label
    assert b.vs_plain[OVER][0] == approx(0.625 / 0.7)
    b = best[1024]  # one-shot slower than the ring: t_plain is the reference, vs plain = vs baseline
    assert (b.label, b.plain, b.t_plain_ms, b.speedup_plain) == ("baseline", "baseline", 1.0, 1.0)
    assert b.vs_plain[OVER][0] == approx(1 / 1.1)
    assert b.references == ["baseline:comm=oneshot"]
    # the reference of every speedup stays the ring: a plain reference's record never becomes t_base
    assert {x.t_base_ms for x in best.values()} == {1.0}
    assert select.threshold((m, x.strategy) for m, x in best.items()) == 4096  # 2048 ships a plain all-reduce
    assert math.isnan(metrics.eta_vs_plain(0.62, 0.61, 0.5, 0.6))  # room 0.02 below 5% of t_plain: n/a


def test_tables_summary_and_plot_show_vs_best_plain(tmp_path):
    decisions = select.decide(bucket_records(), unconfirmed=True)
    rows = {(r["M"], r["label"]): r for r in report.table_rows(decisions)}
    assert rows[4096, OVER]["vs_plain"] == approx(0.8 / 0.7)
    assert rows[4096, OVER]["eta_plain"] == approx(0.5)
    assert rows[4096, "baseline"]["t_plain_ms"] == 0.8 and math.isnan(rows[2048, "baseline:comm=twoshot"]["vs_plain"])
    verdicts = [report.verdict(d) for d in decisions]
    assert verdicts[0].startswith("At M=1024, neither wins: the ring baseline")
    assert verdicts[1].startswith("At M=2048, a faster plain all-reduce (`baseline:comm=oneshot`) wins, 1.600×")
    assert verdicts[2].startswith("At M=4096, overlap wins (`chunked:chunks=2,comm=stream`), 1.429× vs baseline, "
                                  "1.143× vs best plain (`baseline:comm=oneshot`)")
    assert all(v.endswith("(first pass, unconfirmed).") for v in verdicts)
    for r in bucket_records():
        RunFolder(tmp_path).append(r)
    report.write_tables(decisions, tmp_path)
    report.write_report(tmp_path, decisions=decisions)
    md, summary = (tmp_path / "tables.md").read_text(), (tmp_path / "summary.md").read_text()
    assert "| vs_plain |" in md and "Plain references measured: `baseline:comm=oneshot`, `baseline:comm=twoshot`" in md
    assert "| vs best plain | eta vs plain |" in summary and f"- {verdicts[2]}" in summary
    assert select.PLAIN_RULE in summary
    fig = plots._plot_speedup(plt, plots.Group(decisions[0].key.group, decisions))
    assert any(line.get_label().startswith("best plain all-reduce per M") for line in fig.axes[0].lines)
    plt.close(fig)


def test_without_references_vs_plain_is_said_once_and_equals_vs_baseline(tmp_path):
    recs = [r for r in bucket_records() if not r.label.startswith("baseline:")]
    decisions = select.decide(recs, unconfirmed=True)
    assert all(d.best.speedup_plain == approx(d.best.speedup) for d in decisions)
    for r in recs:
        RunFolder(tmp_path).append(r)
    report.write_tables(decisions, tmp_path)
    report.write_report(tmp_path, decisions=decisions)
    md, summary = (tmp_path / "tables.md").read_text(), (tmp_path / "summary.md").read_text()
    assert "vs_plain" not in md and md.count("vs best plain equals vs baseline") == 1
    assert "vs best plain |" not in summary and summary.count("vs best plain equals vs baseline") == 1


# ---- a confirmed reference ships, exports, loads and is served ---------------------------------------------------

def ab_records(first: Record, fast: float, repeats: int = 8) -> list[Record]:
    """``first`` measured against the ring baseline as ``bench.run_ab`` writes it, ``fast`` times as fast."""
    out = []
    for i in range(repeats):
        for side, r, tps in (("a", rec(first.M, "baseline", 1.0), 100.0 + i % 3),
                             ("b", first, (100.0 + (i + 1) % 3) * fast)):
            out.append(dataclasses.replace(r, kind="confirm", tokens_per_s=tps, extra={
                "side": side, "repeat": i, "repeats": repeats, "pair": ["baseline", first.label],
                "first_pass_speedup": 1.6, "candidates": 3}))
    return out


def test_a_confirmed_reference_ships_and_is_exported(tmp_path):
    first = [rec(2048, "baseline", 1.0), rec(2048, "baseline:comm=oneshot", 0.625), rec(2048, OVER, 0.7)]
    assert confirm.leaders({r.label: 1.0 / r.t_ms for r in first}) == ["baseline:comm=oneshot", OVER]
    jobs = plan_stage(first, set(), {})  # the confirmation's candidates: the reference too, its settings typed
    assert [(j.case.strategy, j.case.settings) for j in jobs][0] == ("baseline", BaselineSettings("oneshot"))
    confirmations = ab_records(first[1], 1.5) + ab_records(first[2], 1.3)
    [d] = select.decide(first, confirmations)
    assert (d.strategy, d.settings, d.label, d.why) == ("baseline", {"comm": "oneshot"}, "baseline:comm=oneshot",
                                                         "confirmed")
    assert report.verdict(d).startswith("At M=2048, a faster plain all-reduce (`baseline:comm=oneshot`) wins")
    run = RunFolder(tmp_path / "run")
    for r in first:
        run.append(r)
    for r in confirmations:
        run.append(r, CONFIRM)
    [path] = export.export_policy(tmp_path / "run", tmp_path / "p.yaml")
    bucket = yaml.safe_load(path.read_text())["shapes"]["64,64"]["buckets"][2048]
    assert (bucket["strategy"], bucket["settings"]) == ("baseline", {"comm": "oneshot"})
    choice = policy.load_policy(path).choose(K=64, N=64, M=4096)
    assert (choice.strategy, choice.settings, choice.label) == ("baseline", BaselineSettings("oneshot"),
                                                                "baseline:comm=oneshot")


@pytest.fixture
def gloo1():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def _layer(tmp_path, comm: str) -> RowParallelLinear:
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump({"meta": {"device": "cpu", "world_size": 1, "dtype": "float32"}, "shapes": {
        "8,12": {"buckets": {4: {"strategy": "baseline", "settings": {"comm": comm}}}}}}))
    return RowParallelLinear(8, 12, policy=policy.load_policy(path))


def test_the_layer_falls_back_from_an_unavailable_reference_once(gloo1, tmp_path, caplog):
    layer = _layer(tmp_path, "oneshot")
    with caplog.at_level(logging.WARNING, logger="overlap_bench.layer"):
        for m in (4, 6):
            x = torch.randn(m, 8)
            torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
            assert layer.last_choice.label == "baseline" and "baseline:comm=oneshot cannot run" in \
                layer.last_choice.reason and "gloo" in layer.last_choice.reason
    assert caplog.text.count("baseline:comm=oneshot") == 1 and "(warned once)" in caplog.text


def test_the_layer_serves_a_reference_with_its_settings(gloo1, tmp_path, monkeypatch):
    """A stand-in for the GPU path (available, runs the ring underneath) shows the chosen settings reach
    ``strategies.run``: the layer does not take ``strategy == baseline`` for the ring."""
    ring, seen = strategies.get("baseline"), []

    def standin(x, w, b, group, settings):
        seen.append(settings.comm)
        return ring.fn(x, w, b, group, BaselineSettings())

    monkeypatch.setitem(strategies.REGISTRY, "baseline", dataclasses.replace(ring, fn=standin, check=None))
    layer = _layer(tmp_path, "symm")
    x = torch.randn(5, 8)
    torch.testing.assert_close(layer(x), torch.nn.functional.linear(x, layer.weight, layer.bias))
    assert seen == ["symm"] and layer.last_choice.label == "baseline:comm=symm"
    layer(torch.randn(3, 8))  # below the bucket: the ring, with its own settings
    assert seen == ["symm", "nccl"] and layer.last_choice.label == "baseline"

"""interference (CPU parts): the prediction model, the bracketing statistics, input parsing, the record schema,
the outputs from a run folder, and the command line without a GPU."""

import json
import math
from pathlib import Path

import pytest
from typer.testing import CliRunner

from overlap_bench import metrics
from overlap_bench.research import eta_bound, interference as itf, interference_report as rep
from overlap_bench.cli import app
from overlap_bench.errors import UserError
from overlap_bench.records import Record, load_records
from overlap_bench.runfolder import RunFolder
from overlap_bench.spec import Shape

runner = CliRunner()


# ---------------------------------------------------------------- the model: known inputs -> known outputs

def test_interp_slowdown_linear_with_zero_at_zero_and_no_extrapolation():
    curve = {8: 0.10, 24: 0.30, 32: 0.50}
    assert eta_bound.interp_slowdown(curve, 0) == 0.0
    assert eta_bound.interp_slowdown(curve, 4) == pytest.approx(0.05)
    assert eta_bound.interp_slowdown(curve, 16) == pytest.approx(0.20)
    assert eta_bound.interp_slowdown(curve, 24) == pytest.approx(0.30)
    assert eta_bound.interp_slowdown(curve, 28) == pytest.approx(0.40)
    assert math.isnan(eta_bound.interp_slowdown(curve, 33))
    assert math.isnan(eta_bound.interp_slowdown({}, 4))


def test_joint_models_known_values():
    # GEMM-bound: t_gemm 3, t_comm 1.2, s 0.1 -> max model 3.3; rate model 3 + 1.2 * 0.1 / 1.1.
    assert eta_bound.joint_ms(3.0, 1.2, 0.1, "max") == pytest.approx(3.3)
    assert eta_bound.joint_ms(3.0, 1.2, 0.1, "rate") == pytest.approx(3.0 + 1.2 * 0.1 / 1.1)
    # Communication-bound: the slowed GEMM ends under the all-reduce: both models give t_comm.
    assert eta_bound.joint_ms(0.75, 1.2, 0.4, "max") == pytest.approx(1.2)
    assert eta_bound.joint_ms(0.75, 1.2, 0.4, "rate") == pytest.approx(1.2)
    # ...until the slowed GEMM outlasts it: max model 0.75 * 1.8 = 1.35; rate 0.75 + 1.2 * 0.8 / 1.8.
    assert eta_bound.joint_ms(0.75, 1.2, 0.8, "max") == pytest.approx(1.35)
    assert eta_bound.joint_ms(0.75, 1.2, 0.8, "rate") == pytest.approx(0.75 + 1.2 * 0.8 / 1.8)
    # No slowdown: the floor max(t_gemm, t_comm).
    assert eta_bound.joint_ms(3.0, 1.2, 0.0, "rate") == pytest.approx(3.0)
    with pytest.raises(ValueError):
        eta_bound.joint_ms(1, 1, 0, "min")


def test_rate_model_never_above_max_model():
    for tg in (0.2, 1.0, 3.0):
        for tc in (0.1, 1.0, 5.0):
            for s in (0.0, 0.05, 0.5, 2.0):
                assert eta_bound.joint_ms(tg, tc, s, "rate") <= eta_bound.joint_ms(tg, tc, s, "max") + 1e-12


def test_eta_implied_and_prediction_errors():
    # t_base 4.2, ideal 3.0: t_joint 3.3 hides 0.9 of 1.2 -> eta 0.75.
    assert eta_bound.eta_of_joint(3.0, 1.2, 3.3) == pytest.approx(0.75)
    assert eta_bound.eta_of_joint(3.0, 1.2, 3.3, t_base=4.5) == pytest.approx(1.2 / 1.5)
    p = eta_bound.predict(shape="d", K=7392, N=8192, M=16384, t_gemm=3.0, t_comm=1.2, curve={24: 0.1}, ctas=24,
                          comm_from="x", t_joint_measured=3.4)
    assert p.slowdown == pytest.approx(0.1)
    assert p.t_joint_max_ms == pytest.approx(3.3) and p.eta_max == pytest.approx(0.75)
    assert p.err_max == pytest.approx((3.3 - 3.4) / 3.4)
    assert p.eta_measured == pytest.approx(0.8 / 1.2)
    summ = eta_bound.error_summary([p])
    assert summ["median_abs_err_max"] == pytest.approx(0.1 / 3.4)


def test_allreduce_ms_is_the_inverse_of_busbw():
    t = metrics.allreduce_ms(16384, 8192, "bfloat16", 4, 330.0)
    # 256 MiB * 2 * 3/4 / 330 GB/s
    assert t == pytest.approx(16384 * 8192 * 2 * 1.5 / 330e9 * 1e3)
    assert metrics.busbw_gbps(16384, 8192, "bfloat16", 4, t) == pytest.approx(330.0)
    assert math.isnan(metrics.allreduce_ms(16384, 8192, "bfloat16", 1, 330.0))


# ---------------------------------------------------------------- bracketing

def test_bracketed_slowdown_range_and_drift_flag():
    b = itf.bracketed([1.1, 1.2], [1.0, 1.0], [1.0, 1.0], [0.01])
    assert b.slowdown == pytest.approx(0.15) and b.lo == pytest.approx(0.1) and b.hi == pytest.approx(0.2)
    assert b.drift == 0 and not b.drift_flag
    # The reference moved 20% within a round while the slowdown's range is 0: flagged.
    d = itf.bracketed([1.1], [0.9], [1.1], [0.01])
    assert d.slowdown == pytest.approx(0.1) and d.drift == pytest.approx(0.2) and d.drift_flag
    # A drift within the references' own noise is not flagged.
    assert not itf.bracketed([1.1], [1.0], [1.01], [0.05]).drift_flag
    with pytest.raises(ValueError):
        itf.bracketed([1.0], [1.0], [])


# ---------------------------------------------------------------- parsing

def test_parsers():
    assert itf.parse_ctas("8,1, 4") == [1, 4, 8]
    assert itf.parse_ctas("none") == []
    assert itf.parse_rates("14,0") == [14.0, 0.0]
    assert itf.parse_copies("d2d") == ["d2d"]
    assert itf.parse_sms("all,all-8,100") == ["all", "all-8", "100"]
    assert [itf.resolve_sms(s, 132) for s in ("all", "all-8", "100")] == [132, 124, 100]
    for fn, text, field in ((itf.parse_ctas, "0", "--ctas"), (itf.parse_ctas, "x", "--ctas"),
                            (itf.parse_rates, "-1", "--cta-gbps"), (itf.parse_copies, "p2p", "--copy"),
                            (itf.parse_sms, "most", "--sms")):
        with pytest.raises(UserError, match=field):
            fn(text)
    with pytest.raises(UserError, match="--sms"):
        itf.resolve_sms("all-200", 132)
    shapes, toks, dt = itf.shapes_for(None, None, 4, [])
    assert [(s.K, s.N) for s in shapes] == [(2048, 8192), (7392, 8192)] and toks is None
    # A tp=8 spec at tp=4: K per rank follows --tp, tokens and dtype come from the spec.
    root = Path(__file__).resolve().parents[1]
    shapes, toks, dt = itf.shapes_for(root / "sweeps" / "llama-3.1-70b-tp8.yaml", None, 4, [])
    assert [(s.K, s.N) for s in shapes] == [(2048, 8192), (7168, 8192)] and toks and dt == "bfloat16"
    with pytest.raises(UserError, match="SPEC"):
        itf.shapes_for(root / "sweeps" / "llama-3.1-70b-tp8.yaml", "qwen2.5-72b", 4, [])


def test_conditions_order():
    cfg = itf.InterferenceConfig([Shape("a", 8, 8)], [64], ctas=[1, 8], cta_gbps=[14.0], copies=["d2d"],
                                 sms=["all", "all-8"])
    labels = [c.label for c in cfg.conditions(132)]
    assert labels == ["ctas:k=1,gbps=14", "ctas:k=8,gbps=14", "copy:d2d", "green:sms=132", "green:sms=124"]


# ---------------------------------------------------------------- records and outputs from a run folder

def _rec(shape, k, m, cond: "itf.Condition", s, t_ref):
    r = Record(shape=shape, K=k, N=8192, M=m, dtype="bfloat16", world=1, backend="cuda", device="FakeGPU",
               strategy=itf.STRATEGY, settings=cond.settings, label=cond.label, env={}, t_ms=t_ref * (1 + s),
               t_base_ms=t_ref, t_gemm_ms=t_ref, rel_err=0.0, tol=0.02)
    r.extra = {"slowdown": s, "slowdown_lo": s - 0.01, "slowdown_hi": s + 0.01, "drift": 0.0, "drift_flag": False,
               "rounds": 2, "covered": 1.0}
    if cond.kind == "green":
        r.extra["sms_device"] = 132
    return r


def _fake_run(tmp_path):
    run = tmp_path / "itf"
    w = RunFolder(run)
    for shape, k, t in (("q/o_proj", 2048, 0.75), ("q/down_proj", 7392, 3.0)):
        for k_ctas, s in ((8, 0.05), (24, 0.1), (32, 0.2)):
            w.append(_rec(shape, k, 16384, itf.Condition("ctas", k_ctas, 14.0), s, t))
        w.append(_rec(shape, k, 16384, itf.Condition("copy", "d2d"), 0.07, t))
        w.append(_rec(shape, k, 16384, itf.Condition("green", 124), 0.12, t))
    multi = tmp_path / "h100x4"
    mw = RunFolder(multi)
    for shape, k, tg, tc, tj in (("q/o_proj", 2048, 0.74, 1.21, 1.25), ("q/down_proj", 7392, 2.93, 1.27, 3.3)):
        r = Record(shape=shape, K=k, N=8192, M=16384, dtype="bfloat16", world=4, backend="nccl", device="H100",
                   strategy="baseline", settings={}, label="baseline", env={"CUDA_DEVICE_MAX_CONNECTIONS": "1"},
                   t_ms=tg + tc, t_base_ms=tg + tc, t_gemm_ms=tg, t_comm_ms=tc, extra={"t_joint_ms": tj})
        mw.append(r)
    return run, multi


def test_record_schema_round_trip(tmp_path):
    run, _ = _fake_run(tmp_path)
    recs = load_records(run).records
    assert len(recs) == 10 and not load_records(run).torn_lines
    r = recs[0]
    assert r.strategy == "interference" and r.settings == {"beside": "ctas", "ctas": 8, "cta_gbps": 14.0}
    assert r.extra["slowdown"] == 0.05 and r.world == 1
    assert json.loads(r.to_json())["label"] == "ctas:k=8,gbps=14"


def test_a_measured_condition_is_a_record_of_kind_interference():
    # Built by the measuring code itself (an unavailable green context needs no GPU); the kind tells an
    # interference folder's records from a sweep's.
    cfg = itf.InterferenceConfig([Shape("a", 8, 8)], [64], ctas=[8], cta_gbps=[14.0], copies=[], sms=["all-8"])
    rec = itf._record(cfg.shapes[0], 64, cfg, itf.Condition("green", 124), [], math.nan, "no green contexts here",
                      "cpu", None)
    assert rec.kind == "interference" and rec.status == "unavailable"
    assert Record.from_json(json.loads(rec.to_json())).kind == "interference"


def test_predictions_from_runs_match_hand_computation(tmp_path):
    run, multi = _fake_run(tmp_path)
    recs = load_records(run).records
    preds = rep.predict_from_runs(recs, [multi], 24)
    by = {p.shape: p for p in preds}
    d = by["q/down_proj"]
    assert d.slowdown == pytest.approx(0.1) and d.t_gemm_ms == 2.93 and d.t_comm_ms == 1.27
    assert d.t_joint_max_ms == pytest.approx(2.93 * 1.1)
    assert d.err_max == pytest.approx((2.93 * 1.1 - 3.3) / 3.3)
    assert d.env == "CUDA_DEVICE_MAX_CONNECTIONS=1" and d.comm_from == "H100 x4"
    assert by["q/o_proj"].t_joint_rate_ms == pytest.approx(1.21)  # 0.74 * 1.1 < 1.21
    b = rep.predict_from_busbw(recs, 330.0, 4, 16)
    assert {p.shape for p in b} == {"q/o_proj", "q/down_proj"}
    o = next(p for p in b if p.shape == "q/o_proj")
    assert o.slowdown == pytest.approx(0.075) and o.t_gemm_ms == 0.75
    assert o.t_comm_ms == pytest.approx(metrics.allreduce_ms(16384, 8192, "bfloat16", 4, 330.0))


def test_slowdown_table_cells(tmp_path):
    run, _ = _fake_run(tmp_path)
    recs = load_records(run).records
    recs[1].extra["drift_flag"] = True
    recs[2].extra["covered"] = 0.5
    header, rows = rep.slowdown_table(recs)
    assert header == ["shape", "M", "GEMM alone ms", "k=8", "k=24", "k=32", "copy d2d", "SMs 124"]
    down = next(r for r in rows if r[0] == "q/down_proj")
    assert down[2] == "3.000" and down[3] == "+5.0% [+4, +6]"
    opro = next(r for r in rows if r[0] == "q/o_proj")
    assert opro[4].endswith("!") and opro[5].endswith("?")


# ---------------------------------------------------------------- the command line

def test_cli_without_gpu_exits_2_with_one_line_and_leaves_no_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    for args in (["--tokens", "4096"], ["--out", "o"]):
        res = runner.invoke(app, ["interference", *args])
        assert res.exit_code == 2
        assert res.output.strip().count("\n") == 0 and "needs one CUDA GPU" in res.output
    res = runner.invoke(app, ["interference", "--from", "missing"])
    assert res.exit_code == 2 and res.output.startswith("error: --from: missing")
    assert list(tmp_path.iterdir()) == []  # neither runs/interference, nor --out, nor --from's folder


@pytest.mark.parametrize("args, word", [
    (["--ctas", "0"], "--ctas"), (["--sms", "half"], "--sms"), (["--copy", "nvlink"], "--copy"),
    (["--tokens", "x"], "--tokens"), (["--shape", "12"], "--shape"), (["--preset", "nope"], "--preset"),
    (["--busbw", "300"], "--busbw/--world"), (["--dtype", "int8"], "--dtype"),
])
def test_cli_bad_input(args, word):
    res = runner.invoke(app, ["interference", *args])
    assert res.exit_code == 2, res.output
    assert res.output.startswith("error:") and word in res.output and "Traceback" not in res.output


def test_cli_from_run_predicts_and_writes_outputs(tmp_path):
    run, multi = _fake_run(tmp_path)
    out = tmp_path / "pred"
    res = runner.invoke(app, ["interference", "--from", str(run), "--comm-from", str(multi), "--out", str(out),
                              "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.output)
    assert len(doc["records"]) == 10 and len(doc["predictions"]) == 2
    for name in ("interference.md", "interference.csv", "prediction.md", "prediction.json", "slowdown_ctas.png",
                 "slowdown_sms.png"):
        assert (out / name).is_file(), name
    assert "q/down_proj" in (out / "prediction.md").read_text()
    res = runner.invoke(app, ["interference", "--from", str(run), "--busbw", "330", "--world", "4", "--out",
                              str(tmp_path / "b")])
    assert res.exit_code == 0, res.output
    assert "predicted joint time" in res.output
    bad = runner.invoke(app, ["interference", "--from", str(tmp_path / "nothing")])
    assert bad.exit_code == 2 and "--from" in bad.output


def test_env_names_the_shipped_commit_over_the_surrounding_checkout(monkeypatch):
    # A tree shipped to a GPU host inside another checkout: git would name that checkout's HEAD.
    from overlap_bench import envinfo

    monkeypatch.setenv("OVERLAP_BENCH_GIT_COMMIT", "0123abc")
    assert envinfo.git_commit() == "0123abc"


def test_pace_waits_out_the_period_and_never_sleeps_negative(monkeypatch):
    slept = []
    clock = iter([10.0, 10.004, 10.004, 20.0, 20.0, 30.0, 30.0])
    monkeypatch.setattr(itf.time, "perf_counter", lambda: next(clock))
    monkeypatch.setattr(itf.time, "sleep", slept.append)
    assert itf.pace(None, 0.01) == 10.0 and slept == []            # first repetition: no wait
    assert itf.pace(10.0, 0.01) == 10.004 and slept == [pytest.approx(0.006)]  # 4 ms gone of 10: sleep 6
    assert itf.pace(10.0, 0.01) == 20.0 and len(slept) == 1         # period long past: no sleep at all
    assert itf.pace(20.0, 0.0) == 30.0 and len(slept) == 1


def test_command_defaults_are_the_configs_defaults():
    # One source of defaults: the options a user gets without flags are the config dataclasses' own.
    import typer.main

    from overlap_bench.research.nanobatch import NanoSettings
    from overlap_bench.stats import MIN_EFFECT

    cmds = {c.name: c for c in typer.main.get_command(app).commands.values()}
    opt = {name: {p.name: p.default for p in cmd.params} for name, cmd in cmds.items()}
    i, cfg = opt["interference"], itf.InterferenceConfig([Shape("a", 8, 8)], [64])
    assert (itf.parse_ctas(i["ctas"]), itf.parse_rates(i["cta_gbps"]), itf.parse_copies(i["copy"]),
            itf.parse_sms(i["sms"])) == (cfg.ctas, cfg.cta_gbps, cfg.copies, cfg.sms)
    assert (i["rounds"], i["warmup"], i["reps"], i["comm_ctas"]) == (cfg.rounds, cfg.warmup, cfg.reps,
                                                                     itf.DEFAULT_COMM_CTAS)
    m, nano = opt["model"], NanoSettings()
    assert (m["nanobatches"], m["nano_comm"], m["nano_priority"], m["nano_attention"]) == \
        (nano.nanobatches, nano.comm, nano.priority, nano.attention)
    assert opt["compare"]["min_effect"] == MIN_EFFECT

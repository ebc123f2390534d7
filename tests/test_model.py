"""The model-level prefill benchmark: the sharded stack is a real TP decomposition, every mode gives the
baseline's hidden states, records (kind model) are written with their fields and read back unchanged, their
speedup and eta are the one definitions against the same M's baseline, bad input is a one-line UserError."""

import json
import math

import pytest
import torch
import yaml
from rich.console import Console

from overlap_bench import metrics, runfolder
from overlap_bench.errors import UserError
from overlap_bench.presets import PRESETS, ModelPreset
from overlap_bench.records import Record
from overlap_bench.research import decoder, model


def test_attention_matches_explicit_grouped_query_softmax():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8), torch.randn(1, 2, 7, 8)
    got = decoder.attention(q, k, v)
    mask = torch.ones(7, 7).tril().bool()
    for h in range(4):
        s = (q[0, h] @ k[0, h // 2].T) / math.sqrt(8)
        want = torch.softmax(s.masked_fill(~mask, float("-inf")), -1) @ v[0, h // 2]
        torch.testing.assert_close(got[0, h], want, rtol=1e-5, atol=1e-5)


def test_sharded_stack_equals_the_dense_model():
    """Simulate tp=2 (sum the row-parallel partials) and compare with one dense model made of the shards."""
    p, tp, layers, m = PRESETS["tiny"], 2, 2, 24
    kw = dict(dtype=torch.float64, device=torch.device("cpu"), seed=3)
    shards = [decoder.build_stack(p, tp, r, layers, **kw) for r in range(tp)]
    d, dense_d = decoder.Dims.of(p, tp), decoder.Dims.of(p, 1)
    x = decoder.hidden_states(m, p.hidden, **kw)

    y = x
    for i in range(layers):
        ws = [s[i] for s in shards]
        h = y + sum(decoder.attention_input(w, y, d) @ w.o_proj.T for w in ws)
        y = h + sum(decoder.mlp_input(w, h, d) @ w.down.T for w in ws)

    qw, kvw = d.heads * d.head_dim, d.kv_heads * d.head_dim
    dense = []
    for i in range(layers):
        ws = [s[i] for s in shards]
        qkv = torch.cat([w.qkv[:qw] for w in ws] + [w.qkv[qw:qw + kvw] for w in ws]
                        + [w.qkv[qw + kvw:] for w in ws])
        gate_up = torch.cat([w.gate_up[:d.intermediate] for w in ws] + [w.gate_up[d.intermediate:] for w in ws])
        dense.append(decoder.LayerWeights(ws[0].attn_norm, qkv, torch.cat([w.o_proj for w in ws], 1),
                                        ws[0].mlp_norm, gate_up, torch.cat([w.down for w in ws], 1)))
    want = decoder.stack_forward(dense, x, dense_d, model.nocomm_row)  # tp=1: no all-reduce needed
    torch.testing.assert_close(y, want, rtol=1e-10, atol=1e-10)
    assert y.abs().max() < 100 and y.std() > 0.5  # scaled weights keep unit-order activations


def _policy_file(tmp_path, tp=2):
    """o_proj: chunked:chunks=3 from M=1; down_proj: chunked:chunks=3 from M=100 only (baseline below)."""
    d = decoder.Dims.of(PRESETS["tiny"], tp)
    (ko, n), (kd, _) = d.row_shape("o_proj"), d.row_shape("down_proj")
    entry = {"strategy": "chunked", "settings": {"chunks": 3}, "speedup": 1.1, "eta": 0.5}
    doc = {"meta": {"device": "cpu", "world_size": tp, "dtype": "float32", "backend": "gloo", "required_env": {}},
           "shapes": {f"{ko},{n}": {"name": "tiny/o_proj", "threshold": 1, "buckets": {1: entry}},
                      f"{kd},{n}": {"name": "tiny/down_proj", "threshold": 100, "buckets": {100: entry}}}}
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


def _by(records) -> dict:
    return {(r.M, r.strategy): r for r in records}


def test_modes_agree_and_records_are_written(tmp_path):
    out = tmp_path / "run"
    records = model.model_main("tiny", 2, [64, 100], 2, _policy_file(tmp_path), "float32", 1, 2, out,
                               backend="gloo")
    assert json.loads((out / "env.json").read_text())["torch"] == torch.__version__
    assert [(r.M, r.strategy) for r in records] == [(m, mode) for m in (64, 100) for mode in model.MODES]
    for r in records:
        assert (r.kind, r.shape, r.K, r.N, r.dtype, r.world, r.backend) == \
            ("model", "tiny", 0, PRESETS["tiny"].hidden, "float32", 2, "gloo")
        assert (r.extra["tp"], r.extra["layers"], r.label) == (2, 2, r.strategy)
        assert r.ok and r.status == "ok", r
        assert r.t_ms > 0 and r.tokens_per_s == pytest.approx(r.M / r.t_ms * 1e3)
        assert r.speedup > 0 and (r.warmup, r.reps) == (1, 2)
        assert f"--tokens {r.M} --mode {r.strategy}" in r.repro and "--policy" in r.repro
        if r.strategy in ("pr", "policy", "rowwise", "rowwise+policy"):
            assert r.rel_err <= 1e-5
        assert ("comm_share" in r.extra) == (r.strategy == "baseline")
    by = _by(records)
    chunked = "chunked:chunks=3,comm=stream"
    assert by[64, "policy"].extra["choices"] == {"o_proj": chunked, "down_proj": "baseline"}
    assert "below the smallest bucket" in by[64, "policy"].extra["choice_reasons"]["down_proj"]
    assert by[100, "policy"].extra["choices"] == {"o_proj": chunked, "down_proj": chunked}
    assert by[100, "rowwise+policy"].extra["choices"] == by[100, "policy"].extra["choices"]
    assert by[64, "rowwise+policy"].extra["choice_reasons"] == by[64, "policy"].extra["choice_reasons"]
    assert by[100, "baseline"].extra["choices"] == {"o_proj": "baseline", "down_proj": "baseline"}
    assert by[100, "baseline"].speedup == 1.0
    assert by[100, "baseline"].rel_err == 0.0 and math.isnan(by[100, "nocomm"].rel_err)
    base, nocomm = by[100, "baseline"], by[100, "nocomm"]
    assert base.extra["comm_share"] == pytest.approx((base.t_ms - nocomm.t_ms) / base.t_ms)
    text = _render(model.model_table(records))
    assert "speedup vs baseline" in text and "comm share" in text and "chunked:chunks=3" in text


def test_speedup_and_eta_are_the_one_definitions_and_records_round_trip(tmp_path):
    """Each record's speedup and eta are metrics.speedup / metrics.model_eta of its own times, and those times
    are the same M's baseline and nocomm modes (not another M's, not another mode's); model.jsonl holds
    exactly the returned records, one strict-JSON line each."""
    records = model.model_main("tiny", 2, [48, 96], 1, None, "float32", 0, 3, tmp_path, backend="gloo",
                               modes=("pr",))
    by = _by(records)
    for r in records:
        base, nocomm = by[r.M, "baseline"], by[r.M, "nocomm"]
        assert r.t_base_ms == base.t_ms and r.t_base_iqr_ms == base.t_iqr_ms
        assert r.extra["t_nocomm_ms"] == nocomm.t_ms
        assert r.speedup == metrics.speedup(r.t_base_ms, r.t_ms)
        eta = metrics.model_eta(r.t_base_ms, r.t_ms, r.extra["t_nocomm_ms"], max(base.t_iqr_ms, nocomm.t_iqr_ms))
        assert r.eta == eta or (math.isnan(r.eta) and math.isnan(eta)), (r.strategy, r.M, r.eta, eta)
    assert by[48, "baseline"].t_ms != by[96, "baseline"].t_ms  # a wrong M's reference would show
    lines = (tmp_path / runfolder.MODEL).read_text().splitlines()
    assert lines == [r.to_json() for r in records]
    assert runfolder.RunFolder(tmp_path).load(runfolder.MODEL).records == records
    for line in lines:
        json.loads(line, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))


def test_without_policy_the_policy_mode_is_skipped_and_says_so(tmp_path):
    records = model.model_main("tiny", 2, [16], 1, None, "float32", 0, 1, tmp_path, backend="gloo")
    by = {r.strategy: r for r in records}
    assert set(by) == set(model.MODES)
    assert by["policy"].status == "skipped" and not by["policy"].ok
    assert "no policy file" in by["policy"].reason and math.isnan(by["policy"].t_ms)
    assert math.isnan(by["policy"].speedup) and math.isnan(by["policy"].eta)
    assert all(by[m].ok for m in ("baseline", "pr", "nocomm"))
    assert "skipped" in _render(model.model_table(records))


def _render(table) -> str:
    console = Console(width=250, record=True)
    console.print(table)
    return console.export_text()


@pytest.mark.parametrize("preset,tp,field", [("tiny", 3, "heads=4"), ("qwen2.5-72b", 16, "kv_heads=8")])
def test_tp_not_dividing_the_preset_names_the_field(preset, tp, field):
    with pytest.raises(UserError, match=field) as info:
        model.model_main(preset, tp, [64], 1, None, "float32", 0, 1, "unused", backend="gloo")
    assert "--tp" in str(info.value) and "\n" not in str(info.value)


def test_intermediate_not_divisible_names_the_field(monkeypatch):
    monkeypatch.setitem(PRESETS, "odd", ModelPreset(hidden=64, intermediate=90, heads=4, kv_heads=4,
                                                    head_dim=16, layers=1))
    with pytest.raises(UserError, match="intermediate=90"):
        model.validate("odd", 4, [8], 1, "float32", 0, 1)


def test_bad_inputs_are_user_errors(tmp_path):
    with pytest.raises(UserError, match="unknown preset 'nope'"):
        model.model_main("nope", 2, [64], 1, None, "float32", 0, 1, tmp_path, backend="gloo")
    with pytest.raises(UserError, match="--layers"):
        model.validate("tiny", 2, [64], 0, "float32", 0, 1)
    with pytest.raises(UserError, match="--tokens"):
        model.validate("tiny", 2, [0], 1, "float32", 0, 1)
    with pytest.raises(UserError, match="--dtype"):
        model.validate("tiny", 2, [8], 1, "fp8", 0, 1)
    with pytest.raises(UserError, match="--nproc"):
        model.model_main("tiny", 2, [64], 1, None, "float32", 0, 1, tmp_path, backend="gloo", nproc=4)
    bad = tmp_path / "p.yaml"
    bad.write_text(yaml.safe_dump({"meta": {"device": "cpu", "world_size": 4, "dtype": "float32"}, "shapes": {}}))
    with pytest.raises(UserError, match="world_size is 4, expected 2"):
        model.model_main("tiny", 2, [64], 1, bad, "float32", 0, 1, tmp_path / "o", backend="gloo")


def test_cli_json_prints_the_records_as_strict_json(tmp_path):
    from typer.testing import CliRunner

    from overlap_bench.cli import app

    res = CliRunner().invoke(app, ["model", "--preset", "tiny", "--backend", "gloo", "--nproc", "2", "--tokens", "8",
                                   "--layers", "1", "--dtype", "float32", "--warmup", "0", "--reps", "1",
                                   "--mode", "baseline", "--out", str(tmp_path), "--json"])
    assert res.exit_code == 0, res.output
    doc = json.loads(res.stdout, parse_constant=lambda c: pytest.fail(f"non-strict JSON constant {c}"))
    saved = runfolder.RunFolder(tmp_path).load(runfolder.MODEL).records
    assert doc == [json.loads(r.to_json()) for r in saved]
    want = [("model", "baseline", True), ("model", "nocomm", True)]
    assert [(d["kind"], d["strategy"], d["ok"]) for d in doc] == want
    assert doc[1]["rel_err"] is None and doc[0]["speedup"] == 1.0  # nocomm is not checked: NaN prints as null


def _model_cli(*args):
    from typer.testing import CliRunner

    from overlap_bench.cli import app

    return CliRunner().invoke(app, ["model", *map(str, args)])


def test_default_on_a_cpu_machine_is_the_tiny_preset_in_float32(tmp_path, monkeypatch):
    monkeypatch.setattr("overlap_bench.world.gpu_count", lambda: 0)
    monkeypatch.delitem(PRESETS, "qwen2.5-72b")  # the GPU default must not be what a CPU machine runs
    res = _model_cli("--nproc", 2, "--layers", 1, "--warmup", 0, "--reps", 1, "--mode", "baseline", "--out", tmp_path)
    assert res.exit_code == 0, res.output
    records = runfolder.RunFolder(tmp_path).load(runfolder.MODEL).records
    assert {(r.shape, r.dtype, r.backend) for r in records} == {("tiny", "float32", "gloo")}
    assert sorted({r.M for r in records}) == [64, 256]


def test_a_large_preset_on_cpu_gets_a_one_line_note_naming_the_small_run():
    note = model.scale_note("qwen2.5-72b", 2, [8192, 32768], 4, "bfloat16")
    assert "GiB" in note and "TFLOP" in note and "--preset tiny --dtype float32" in note and "\n" not in note
    assert model.scale_note("tiny", 2, [64, 256], 4, "float32") is None


def test_a_second_run_into_one_out_is_refused_and_resume_records_only_the_missing_rows(tmp_path):
    model.model_main("tiny", 2, [8], 1, None, "float32", 0, 1, tmp_path, backend="gloo", modes=("baseline",))
    first = (tmp_path / runfolder.MODEL).read_text().splitlines()
    assert len(first) == 2
    res = _model_cli("--preset", "tiny", "--backend", "gloo", "--nproc", 2, "--tokens", 8, "--layers", 1,
                     "--dtype", "float32", "--mode", "baseline", "--out", tmp_path)
    assert res.exit_code == 2 and "--resume" in res.output and res.output.strip().count("\n") == 0, res.output
    assert (tmp_path / runfolder.MODEL).read_text().splitlines() == first
    records = model.model_main("tiny", 2, [8, 16], 1, None, "float32", 0, 1, tmp_path, backend="gloo",
                               modes=("pr",), resume=True, progress=True)
    lines = (tmp_path / runfolder.MODEL).read_text().splitlines()
    assert lines[:2] == first  # the first run's rows stay, and are not measured again
    added = [json.loads(line) for line in lines[2:]]
    assert sorted((d["M"], d["strategy"]) for d in added) == [(8, "pr"), (16, "baseline"), (16, "nocomm"),
                                                              (16, "pr")]
    assert [(r.M, r.strategy) for r in records] == [(m, mode) for m in (8, 16) for mode in ("baseline", "pr", "nocomm")]
    again = model.model_main("tiny", 2, [16], 1, None, "float32", 0, 1, tmp_path, backend="gloo", modes=("pr",),
                             resume=True)
    assert again == records[3:] and (tmp_path / runfolder.MODEL).read_text().splitlines() == lines


def test_policy_modes_without_a_policy_and_a_bad_shapes_tp_are_refused_by_their_flag(tmp_path):
    for mode in ("nanobatch+policy", "policy,pr"):
        res = _model_cli("--preset", "tiny", "--backend", "gloo", "--nproc", 2, "--tokens", 8, "--dtype", "float32",
                         "--mode", mode, "--out", tmp_path / "o")
        assert res.exit_code == 2 and "--policy" in res.output and res.output.strip().count("\n") == 0, res.output
    assert not (tmp_path / "o").exists()
    with pytest.raises(UserError, match=r"^--shapes-tp 3: tiny heads=4 .* use a --shapes-tp that divides"):
        model.model_main("tiny", None, [8], 1, None, "float32", 0, 1, tmp_path, backend="gloo", nproc=1,
                         shapes_tp=3)


def test_table_shows_each_time_with_its_spread_and_marks_speedups_within_it():
    def rec(mode, t, iqr, rounds=()):
        return Record(shape="tiny", K=0, N=256, M=64, dtype="float32", world=2, backend="gloo", device="cpu",
                      strategy=mode, settings={}, label=mode, env={}, kind="model", t_ms=t, t_iqr_ms=iqr,
                      t_base_ms=10.0, t_base_iqr_ms=0.1, speedup=metrics.speedup(10.0, t),
                      extra={"t_rounds_ms": list(rounds)})

    records = [rec("baseline", 10.0, 0.1, (9.8, 10.0, 10.3)), rec("pr", 9.7, 0.05, (9.7, 9.75)),
               rec("nanobatch", 8.0, 0.2), rec("policy", math.nan, math.nan)]
    text = _render(model.model_table(records))
    rows = {line.split("│")[2].strip(): line for line in text.splitlines() if line.count("│") > 3}
    # spread: the rounds' range where it is larger than the IQR (baseline, 0.5), else the IQR (pr, nanobatch)
    assert "10.00 (0.50)" in rows["baseline"] and "9.70 (0.05)" in rows["pr"] and "8.00 (0.20)" in rows["nanobatch"]
    assert "1.031 ~" in rows["pr"] and "1.250" in rows["nanobatch"] and "~" not in rows["nanobatch"]
    assert "~" not in rows["baseline"] + rows["policy"] and "within spread" in text

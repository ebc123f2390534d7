"""The command line end to end on CPU/gloo: run, sweep (+resume), export, compare, report, bad input."""

import json

import pytest
import yaml
from typer.testing import CliRunner

from overlap_bench import __version__, cli, confirm, select
from overlap_bench.cli import app
from overlap_bench.policy import load_policy
from overlap_bench.records import load_records
from overlap_bench.spec import SMOKE, load_spec

runner = CliRunner()


def _ok(args):
    res = runner.invoke(app, args)
    assert res.exit_code == 0, res.output
    return res


def _bad(args, *words):
    res = runner.invoke(app, args)
    assert res.exit_code == 2, res.output
    assert "Traceback" not in res.output
    assert res.output.strip().startswith("error:"), res.output
    for w in words:
        assert w in res.output, res.output
    return res


def test_version_and_help():
    assert _ok(["--version"]).output.strip() == f"overlap-bench {__version__}"
    for cmd in ["run", "sweep", "compare", "export", "report", "model", "strategies", "interference"]:
        text = runner.invoke(app, [cmd, "--help"], terminal_width=200).output
        assert "Usage" in text and "<bool>" not in text and "[[" not in text, text
    text = runner.invoke(app, ["sweep", "--help"], terminal_width=200).output
    assert "[SPEC]" in text and "--dry-run" in text and "--no-confirm" in text


def test_strategies_lists_every_settings_values_and_range():
    text = runner.invoke(app, ["strategies"], terminal_width=200).output
    chunked = [line for line in text.splitlines() if "│" in line and line.split("│")[2].strip()]
    allowed = {line.split("│")[2].strip(): line.split("│")[3].strip() for line in chunked}
    assert allowed["comm"] == "stream, async, symm, ce" and allowed["split"] == "even, edges, geo"
    assert allowed["chunks"] == "integer >= 1" and allowed["ratio"] == "number > 0"
    assert allowed["priority"] == "true, false"


def test_run_json_has_every_metric_and_checks_numerics():
    res = _ok(["run", "--shape", "64,96", "--tokens", "40", "--strategy", "pr", "--strategy", "chunked:chunks=3",
               "--dtype", "float32", "--reps", "3", "--warmup", "1", "--bias", "--json"])
    rows = [json.loads(line) for line in res.output.splitlines() if line.startswith("{")]
    assert [r["label"] for r in rows] == ["baseline", "pr", "chunked:chunks=3,comm=stream"]
    for r in rows:
        assert r["ok"] and r["rel_err"] <= 1e-5 and r["backend"] == "gloo" and r["world"] == 2
        for key in ["t_ms", "t_base_ms", "t_gemm_ms", "t_comm_ms", "speedup", "tflops", "busbw_gbps", "tokens_per_s"]:
            assert r[key] is not None and r[key] > 0, key
        assert r["repro"].startswith("overlap-bench run --shape 64,96 --tokens 40")


def test_smoke_spec_file_equals_embedded_default():
    assert yaml.safe_load(open("sweeps/smoke.yaml")) == SMOKE


@pytest.mark.parametrize("spec", ["sweeps/qwen2.5-72b-tp4.yaml", "sweeps/llama-3.1-70b-tp8.yaml",
                                  "sweeps/llama-3.1-405b-tp8.yaml", "sweeps/qwen2.5-72b-tp8.yaml",
                                  "sweeps/qwen2.5-72b-tp4-eta.yaml", "sweeps/qwen2.5-72b-tp4-levers.yaml"])
def test_ready_specs_validate(spec):
    s, _ = load_spec(spec, backend="gloo")
    assert s.cases() and {sh.name.split("/")[1] for sh in s.shapes} == {"o_proj", "down_proj"}


def test_sweep_resume_export_report(tmp_path):
    out = tmp_path / "run"
    res = runner.invoke(app, ["sweep", "--out", str(out)], terminal_width=250)  # the embedded default (CPU smoke)
    assert res.exit_code == 0, res.output
    recs = load_records(out).records
    table = res.output[res.output.index("shipped per bucket"):]
    decisions = select.decide(recs, confirm.load(out))
    assert len(decisions) == 4 and f"next: overlap-bench export {out} -o policy.yaml" in res.output
    for d in decisions:  # every bucket's row: its shape, M and shipped label
        assert any(d.key.shape in line and f" {d.key.M} " in line and f" {d.label} " in line
                   for line in table.splitlines()), (d.label, table)
    res = _ok(["sweep", "--dry-run", "--out", str(out)])
    assert f"from the {len(recs)} records in {out / 'records.jsonl'}" in res.output
    spec, _ = load_spec(None)
    assert len(recs) == len(spec.cases()) and all(r.ok for r in recs)
    for name in ["records.jsonl", "env.json", "spec.yaml", "tables.csv", "tables.md", "summary.md"]:
        assert (out / name).stat().st_size > 0, name
    # the confirmation stage ran: every bucket's leaders re-measured against the baseline, 7 repeats a side
    samples = confirm.by_bucket(confirm.load(out))
    assert len(samples) == 4 and all(len(a) == len(b) == 7 for per in samples.values() for a, b in per.values())
    assert {lab for per in samples.values() for lab in per} >= {"pr"} and all("baseline" not in per
                                                                              for per in samples.values())
    lines = (out / "confirm.jsonl").read_text()
    _bad(["sweep", "--out", str(out)], "--resume")           # never mixes runs silently
    res = _ok(["sweep", "--out", str(out), "--resume"])     # nothing left: nothing re-measured
    assert "0 cases measured" in res.output and len(load_records(out).records) == len(recs)
    assert "0 candidate(s) confirmed" in res.output and (out / "confirm.jsonl").read_text() == lines
    pol = tmp_path / "p.yaml"
    _ok(["export", str(out), "-o", str(pol)])
    doc = yaml.safe_load(pol.read_text())
    for shape in doc["shapes"].values():
        for b in shape["buckets"].values():  # shipped only where the confirmed CI's lower bound clears 1.01
            c = b["confirmation"]
            assert c["repeats"] == 7 and c["candidates"] == 6
            assert b["strategy"] == "baseline" or c["ci"][0] > 1 + confirm.MIN_EFFECT
    choice = load_policy(pol).choose(K=128, N=256, M=300)
    assert choice.bucket == 256
    _ok(["report", str(out)])
    _bad(["export", str(tmp_path / "nothing"), "-o", str(pol)], "records.jsonl")


def test_compare_strategies_and_run_dirs(tmp_path):
    res = _ok(["compare", "baseline", "pr", "--repeats", "2", "--tokens", "32", "--reps", "2", "--warmup", "1",
               "--json", "--out", str(tmp_path / "cmp")])
    doc = json.loads(res.output[res.output.index("{"):])
    assert len(doc["rows"]) == 2 and all(len(r["samples_a"]) == 2 for r in doc["rows"])
    assert (tmp_path / "cmp" / "compare.md").read_text().count("|") > 10
    assert {r["shape"] for r in doc["rows"]} == {s["name"] for s in SMOKE["shapes"]}  # no shape given: the machine's
    a, b = tmp_path / "a", tmp_path / "b"
    for d in (a, b):
        _ok(["run", "--tokens", "40", "--strategy", "pr", "--reps", "2", "--warmup", "1", "--out", str(d)])
    recs = load_records(a).records
    assert {(r.shape, r.K, r.N) for r in recs} == {(s["name"], s["K"], s["N"]) for s in SMOKE["shapes"]}
    assert {r.dtype for r in recs} == {"float32"} and len(recs) == 4
    res = _ok(["compare", str(a), str(b), "--json"])
    assert len(json.loads(res.output)["rows"]) == 4


def test_large_explicit_shape_on_cpu_notes_the_scale(monkeypatch):
    ran = []
    monkeypatch.setattr(cli, "run_sweep", lambda spec, *a, **k: ran.append(spec))  # the note, not the hours
    res = _ok(["run", "--shape", "qwen2.5-72b", "--strategy", "pr"])
    assert "note:" in res.output and "TFLOP" in res.output and "leave out the shape flags" in res.output
    assert ran[0].dtypes == ["float32"] and ran[0].tokens == SMOKE["tokens"]  # the rest is still the machine's
    ran.clear()
    assert "note:" not in _ok(["run", "--shape", "64,96", "--strategy", "pr"]).output


def test_dry_run_estimates_from_a_tiny_case_without_records(tmp_path):
    res = _ok(["sweep", "--dry-run", "--out", str(tmp_path / "new")])
    assert "estimate: 24 cases x" in res.output and "measured here on one tiny case" in res.output


@pytest.mark.parametrize("args,words", [
    (["run", "--strategy", "chunked:chunks=0"], ["chunks"]),
    (["run", "--strategy", "nosuch"], ["nosuch"]),
    (["run", "--shape", "12,x"], ["--shape"]),
    (["run", "--tokens", "a,b"], ["--tokens"]),
    (["run", "--backend", "mpi"], ["backend"]),
    (["run", "--backend", "nccl"], ["GPUs"]),
    (["run", "--env", "NOEQUALS"], ["--env"]),
    (["sweep", "no/such/spec.yaml"], ["SPEC"]),
    (["compare", "baseline", "chunked:comm=carrier-pigeon"], ["comm"]),
    (["model", "--preset", "nope"], ["preset"]),
])
def test_bad_input_one_line_exit_2(args, words):
    _bad(args, *words)


@pytest.mark.parametrize("mutate,field", [
    (lambda s: s.update(colour="red"), "colour"),
    (lambda s: s.update(reps="many"), "reps"),
    (lambda s: s.update(tokens=[]), "tokens"),
    (lambda s: s["strategies"][2].update(chunks=[0]), "strategies[2].chunks"),
    (lambda s: s["strategies"][2].update(chunks=[]), "strategies[2].chunks"),
    (lambda s: s.update(shapes=[{"preset": "qwen2.5-72b", "tp": 3}]), "shapes[0]"),
    (lambda s: s.update(shapes=[{"name": "x", "K": 8}]), "shapes[0].N"),
    (lambda s: s.update(world_size=0), "world_size"),
    (lambda s: s.update(backend="nccl"), "backend"),  # NCCL with no GPUs visible
    (lambda s: s.update(dtypes=["float8"]), "dtypes[0]"),
])
def test_bad_spec_names_the_field(tmp_path, mutate, field):
    raw = yaml.safe_load(yaml.safe_dump(SMOKE))
    mutate(raw)
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(raw))
    res = _bad(["sweep", str(path), "--out", str(tmp_path / "o")], field)
    assert len(res.output.strip().splitlines()) == 1
    assert not (tmp_path / "o").exists()  # nothing started


def test_tp_override_expands_a_tp8_spec_at_tp4():
    res = _ok(["sweep", "sweeps/llama-3.1-70b-tp8.yaml", "--tp", "4", "--backend", "gloo", "--dry-run"])
    assert "llama-3.1-70b-tp8-at-tp4" in res.output and "on 4 ranks" in res.output
    assert "K=2048\tN=8192" in res.output and "K=7168\tN=8192" in res.output  # o_proj, down_proj at tp=4
    res = _ok(["sweep", "sweeps/llama-3.1-70b-tp8.yaml", "--backend", "gloo", "--dry-run"])
    assert "on 8 ranks" in res.output and "K=3584\tN=8192" in res.output
    _bad(["sweep", "sweeps/llama-3.1-70b-tp8.yaml", "--tp", "0", "--dry-run"], "--tp")


def test_run_table_shows_every_times_spread_and_marks_a_speedup_inside_it():
    from rich.console import Console

    from overlap_bench.records import Record

    def rec(label: str, t: float, iqr: float, **kw) -> Record:
        return Record(shape="t/a", K=64, N=64, M=32, dtype="float32", world=2, backend="gloo", device="cpu",
                      strategy=label.split(":")[0], settings={}, label=label, env={}, t_ms=t, t_iqr_ms=iqr,
                      t_base_ms=1.0, t_base_iqr_ms=0.1, t_gemm_ms=0.5, t_comm_ms=0.4,
                      extra={"t_gemm_iqr_ms": 0.02, "t_comm_iqr_ms": 0.03}, **kw)

    # Against the reference 1.000 (IQR 0.100): bands of half an IQR either side.
    recs = select.score([rec("baseline", 1.0, 0.1), rec("pr", 0.96, 0.04), rec("chunked:chunks=2", 0.8, 0.04),
                         rec("chunked:chunks=4", 1.2, 0.04), rec("chunked:chunks=8", 0.97, 0.2)])
    console = Console(record=True, width=250)
    console.print(cli.records_table(recs, "title"))
    text = console.export_text()
    rows = {cells[2]: cells for cells in ([c.strip() for c in ln.split("│")[1:-1]] for ln in text.splitlines()
                                          if ln.startswith("│"))}
    assert rows["pr"][3:7] == ["0.960 (0.040)", "1.000 (0.100)", "0.500 (0.020)", "0.400 (0.030)"]
    speedups = {lab: row[7] for lab, row in rows.items()}
    assert speedups == {"baseline": "1.000", "pr": "1.042 ~", "chunked:chunks=2": "1.250",
                        "chunked:chunks=4": "0.833", "chunked:chunks=8": "1.031 ~"}, speedups
    assert "~: the difference from t_base is inside the spread" in text

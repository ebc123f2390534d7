"""Resume identity: a case's key holds every field that makes it another measurement (env variant and bias
included), so ``--resume`` over specs with env variants and with bias on and off records every case exactly once;
and every derived number of a real (gloo) record follows from its own times by the formulas written here."""

from __future__ import annotations

import math
from dataclasses import replace
from types import SimpleNamespace

import pytest
import yaml
from typer.testing import CliRunner

from overlap_bench.cli import app
from overlap_bench.keys import case_key
from overlap_bench.records import Record, load_records
from overlap_bench.runfolder import RunFolder

VARIANT = {"OVERLAP_BENCH_TEST_VARIANT": "1"}
SPEC = {"name": "resume", "backend": "gloo", "world_size": 2, "dtypes": ["float32"],
        "shapes": [{"name": "t/a", "K": 16, "N": 32}], "tokens": [8, 12],
        "strategies": [{"name": "baseline"}, {"name": "chunked", "chunks": 2}], "warmup": 1, "reps": 3,
        "timeout_s": 60}
LABELS = ["baseline", "chunked:chunks=2,comm=stream"]
SEEDED_T = 123.0
"""A time no real run gives: a seeded record that was measured again would show it."""


def _key(**changes):
    base = dict(shape="s", K=8, N=16, M=64, dtype="float32", bias=False, label="baseline", env={}, world=2,
                backend="gloo")
    base.update(changes)
    return case_key(SimpleNamespace(**base))


@pytest.mark.parametrize("change", [dict(env=VARIANT), dict(bias=True), dict(shape="u"), dict(K=9), dict(N=17),
                                    dict(M=65), dict(dtype="bfloat16"), dict(label="pr"), dict(world=4),
                                    dict(backend="nccl")])
def test_every_identity_field_is_in_the_key(change):
    assert _key(**change) != _key()
    assert _key(**change) == _key(**change)


def test_record_key_is_case_key_and_env_order_does_not_matter():
    r = Record(shape="s", K=8, N=16, M=64, dtype="float32", world=2, backend="gloo", device="cpu",
               strategy="baseline", settings={}, label="baseline", env={"B": "2", "A": "1"}, bias=True)
    assert r.key() == _key(env={"A": "1", "B": "2"}, bias=True)
    assert r.key() != replace(r, bias=False).key() and r.key() != replace(r, env={"A": "1"}).key()


def _seed(run_dir, env, bias):
    """Records of the spec's cases in one (env, bias) as if measured earlier, with an impossible time."""
    w = RunFolder(run_dir)
    for m in SPEC["tokens"]:
        for label in LABELS:
            w.append(Record(shape="t/a", K=16, N=32, M=m, dtype="float32", world=2, backend="gloo", device="cpu",
                            strategy=label.split(":")[0], settings={}, label=label, env=dict(env), bias=bias,
                            t_ms=SEEDED_T, t_base_ms=SEEDED_T, warmup=SPEC["warmup"], reps=SPEC["reps"]))


def _sweep(tmp_path, out, **changes):
    path = tmp_path / "spec.yaml"
    path.write_text(yaml.safe_dump({**SPEC, **changes}))
    # --force: these resumes change the spec on purpose (a folder's own spec resumes without it).
    # --no-confirm: these tests are about which cases a resume measures; the confirmation stage has its own.
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(out), "--resume", "--force", "--no-confirm"])
    assert res.exit_code == 0, res.output
    return res


def _check_formulas(r: Record) -> list[str]:
    """Every derived field of an ok record from its own times (float32: 4 bytes; world 2: busbw = algbw)."""
    want = {
        "ideal_ms": max(r.t_gemm_ms, r.t_comm_ms),
        "speedup": r.t_base_ms / r.t_ms,
        "tokens_per_s": r.M / (r.t_ms / 1e3),
        "tflops": 2 * r.M * r.K * r.N / (r.t_ms / 1e3) / 1e12,
        "busbw_gbps": r.M * r.N * 4 / (r.t_comm_ms / 1e3) / 1e9 * 2 * (2 - 1) / 2,
        "tol": 1e-5,
    }
    room = r.t_base_ms - max(r.t_gemm_ms, r.t_comm_ms)
    bad = [f"{k} {getattr(r, k)} != {v}" for k, v in want.items() if getattr(r, k) != pytest.approx(v, rel=1e-9)]
    measurable = room > 0.05 * r.t_base_ms  # eta is n/a below 5% of t_base (a record has no spread)
    if measurable and r.eta != pytest.approx((r.t_base_ms - r.t_ms) / room, rel=1e-9):
        bad.append(f"eta {r.eta}")
    if not measurable and not math.isnan(r.eta):
        bad.append(f"eta {r.eta} without room")
    if not (r.rel_err <= 1e-5 and r.t_ms > 0 and r.t_iqr_ms >= 0 and r.reps == 3 and r.warmup == 1):
        bad.append(f"rel_err {r.rel_err}, t {r.t_ms}, iqr {r.t_iqr_ms}, reps {r.reps}, warmup {r.warmup}")
    return bad


def test_resume_over_env_variants_and_bias_records_every_case_once(tmp_path):
    out = tmp_path / "run"
    # Already measured: the default env with bias. Resuming the two-variant spec with bias must measure exactly
    # the other variant (a key without the env would skip it) ...
    _seed(out, {}, True)
    _sweep(tmp_path, out, bias=True, env=[{}, VARIANT])
    # ... and the same spec without bias must measure the default env again (a key without bias would skip it).
    _sweep(tmp_path, out, bias=False, env=[{}])
    recs = load_records(out).records
    keys = [r.key() for r in recs]
    want = {_key(shape="t/a", K=16, N=32, M=m, bias=bias, label=lab, env=env)
            for m in SPEC["tokens"] for lab in LABELS for env, bias in [({}, True), (VARIANT, True), ({}, False)]}
    assert len(keys) == len(set(keys)) == 12 and set(keys) == want
    seeded = [r for r in recs if r.env == {} and r.bias]
    assert len(seeded) == 4 and all(r.t_ms == SEEDED_T for r in seeded)  # never measured again
    measured = [r for r in recs if r.t_ms != SEEDED_T]
    assert len(measured) == 8 and all(r.ok for r in measured)
    assert {(tuple(r.env.items()), r.bias) for r in measured} == {(tuple(VARIANT.items()), True), ((), False)}
    bad = [f"{r.M} {r.label} {r.env} bias={r.bias}: {b}" for r in measured for b in _check_formulas(r)]
    assert bad == []
    # Nothing left: resuming either spec again measures nothing.
    res = _sweep(tmp_path, out, bias=True, env=[{}, VARIANT])
    assert "0 cases measured" in res.output and len(load_records(out).records) == 12


def test_record_round_trip_keeps_every_field_and_nan(tmp_path):
    r = Record(shape="s", K=8, N=16, M=64, dtype="bfloat16", world=4, backend="nccl", device="NVIDIA H100",
               strategy="chunked", settings={"chunks": 3}, label="chunked:chunks=3", env=dict(VARIANT), bias=True,
               status="ok", t_ms=1.25, t_iqr_ms=0.5, t_base_ms=2.5, t_gemm_ms=1.0, t_comm_ms=2.0, ideal_ms=2.0,
               speedup=2.0, eta=math.nan, rel_err=0.001, tol=0.02, warmup=5, reps=20, extra={"t_joint_ms": 2.25})
    RunFolder(tmp_path).append(r)
    [back] = load_records(tmp_path).records
    assert math.isnan(back.eta) and isinstance(back.eta, float) and math.isnan(back.busbw_gbps)
    same = {k: v for k, v in vars(back).items() if not (isinstance(v, float) and math.isnan(v))}
    assert same == {k: v for k, v in vars(r).items() if not (isinstance(v, float) and math.isnan(v))}
    assert back.key() == r.key()

"""One definition of speedup and eta against one reference, rendered identically by tables.md,
summary.md, the exported policy and ``run``."""

from __future__ import annotations

import math
import re

import pytest
import yaml

from overlap_bench import export, metrics, report, select
from overlap_bench.records import Record, load_records
from overlap_bench.runfolder import RunFolder


def _rec(M, strategy, t, *, t_base, t_gemm, t_comm, settings=None, iqr=0.001, label=None):
    settings = settings or {}
    return Record(shape="q/o_proj", K=2048, N=8192, M=M, dtype="bfloat16", world=4, backend="nccl",
                  device="NVIDIA H100 80GB HBM3", strategy=strategy, settings=settings,
                  label=label or strategy, env={}, t_ms=t, t_iqr_ms=iqr, t_base_ms=t_base, t_base_iqr_ms=0.002,
                  t_gemm_ms=t_gemm, t_comm_ms=t_comm, speedup=t_base / t, rel_err=1e-3)


def _run(tmp_path):
    # M=4096: a slow reference t_base (1.30) beside a faster baseline record (1.00): the reference is 1.00,
    # so the winner (0.80) is 1.25x, not the 1.625x its own record says. M=8192: consistent references.
    recs = [_rec(4096, "baseline", 1.00, t_base=1.30, t_gemm=0.55, t_comm=0.40),
            _rec(4096, "chunked", 0.80, t_base=1.30, t_gemm=0.55, t_comm=0.40, settings={"chunks": 4},
                 label="chunked:chunks=4"),
            _rec(4096, "pr", 0.95, t_base=1.30, t_gemm=0.55, t_comm=0.40),
            _rec(8192, "baseline", 2.00, t_base=2.00, t_gemm=1.10, t_comm=0.80),
            _rec(8192, "chunked", 1.50, t_base=2.00, t_gemm=1.10, t_comm=0.80, settings={"chunks": 4},
                 label="chunked:chunks=4"),
            _rec(8192, "pr", 1.90, t_base=2.00, t_gemm=1.10, t_comm=0.80)]
    w = RunFolder(tmp_path)
    for r in recs:
        w.append(r)
    return recs


def _md_rows(text: str, first_col: str) -> list[dict[str, str]]:
    lines = [ln for ln in text.splitlines() if ln.startswith("| ")]
    out, header = [], None
    for ln in lines:
        cells = [c.strip() for c in ln.strip().strip("|").split("|")]
        if cells[0] == first_col:
            header = cells
        elif header and not set(ln) <= set("|-: "):
            out.append(dict(zip(header, cells)))
    return out


def test_a_bucket_shows_the_same_numbers_in_tables_summary_and_policy(tmp_path):
    _run(tmp_path)
    report.write_tables(select.decide(load_records(tmp_path).records), tmp_path)
    report.write_report(tmp_path)
    [pol] = export.export_policy(tmp_path, tmp_path / "p.yaml", unconfirmed=True)  # the first pass, labelled
    buckets = yaml.safe_load(pol.read_text())["shapes"]["2048,8192"]["buckets"]
    tables = {int(r["M"]): r for r in _md_rows((tmp_path / "tables.md").read_text(), "M") if "✓" in r["best"]}
    summary = {int(r["M"]): r for r in _md_rows((tmp_path / "summary.md").read_text(), "M")}
    expected = {4096: (1.00 / 0.80, (1.00 - 0.80) / (1.00 - 0.55)), 8192: (2.00 / 1.50, (2.00 - 1.50) / (2.00 - 1.10))}
    for m, (speedup, eta) in expected.items():
        assert float(tables[m]["speedup"]) == pytest.approx(speedup, abs=5e-4)
        assert float(summary[m]["speedup"]) == pytest.approx(speedup, abs=5e-4)
        assert buckets[m]["speedup"] == pytest.approx(speedup, abs=5e-5)
        assert float(tables[m]["eta"]) == pytest.approx(eta, abs=5e-4)
        assert float(summary[m]["eta"]) == pytest.approx(eta, abs=5e-3)
        assert buckets[m]["eta"] == pytest.approx(eta, abs=5e-5)
        assert float(tables[m]["t_base_ms"]) == float(summary[m]["t_base (ms)"]) == (1.0 if m == 4096 else 2.0)
        # the peer column is against the same reference
        assert float(summary[m]["pr speedup"]) == pytest.approx((1.00 / 0.95) if m == 4096 else 2.00 / 1.90,
                                                                 abs=5e-4)
    assert "reference drift" in (tmp_path / "summary.md").read_text().split("M=4096:")[1].splitlines()[0]


def test_inconsistent_references_rank_nothing_above_baseline():
    # t_comm above t_base beyond the spread: the machine changed between the reference measurements.
    recs = [_rec(2048, "baseline", 0.448, t_base=0.448, t_gemm=0.30, t_comm=0.552),
            _rec(2048, "chunked", 0.30, t_base=0.448, t_gemm=0.30, t_comm=0.552, settings={"chunks": 4},
                 label="chunked:chunks=4")]
    [b] = select.best(recs)
    assert b.strategy == "baseline" and b.speedup == 1.0 and math.isnan(b.eta)
    assert any(f.startswith("references inconsistent: t_comm") for f in b.flags)


def test_eta_is_na_where_the_hideable_time_is_within_noise():
    assert math.isnan(metrics.eta(1.0, 0.9, 0.97, 0.01))        # room 3% of t_base
    assert math.isnan(metrics.eta(1.0, 0.9, 0.8, 0.1, spread=0.1))  # room 0.2 < 3 x spread
    assert metrics.eta(1.0, 0.9, 0.8, 0.1, spread=0.01) == pytest.approx(0.5)
    assert metrics.reference([(1.3, 0.01), (1.0, 0.02), (math.nan, 0.0)]) == (1.0, 0.02)

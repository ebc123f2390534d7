"""Plant realistic one-line bugs, one at a time, in a scratch copy of the tree and run the tests that should catch
each (issue 19). Not collected by pytest; run by hand: ``python tests/planted_bugs.py [ID ...]``.

Each bug is ``(id, file, old, new, tests)``: ``old`` must occur exactly once in ``file`` (else the bug is reported
``stale``: the code moved and the entry needs updating). The table printed at the end says, per bug, whether the
tests failed (``caught``) and the first failing test.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent

UNIT = ["tests/test_metrics_numerics.py", "tests/test_stats_edges.py", "tests/test_selection_export.py"]
NUM = ["tests/test_metrics_numerics.py"]
TIMING = ["tests/test_timing_harness.py"]
STATS = ["tests/test_stats_edges.py", "tests/test_stats_compare.py"]
SEL = ["tests/test_selection_export.py", "tests/test_analysis_policy.py"]
SPLIT = ["tests/test_strategies.py"]
RESUME = ["tests/test_resume_identity.py"]

BUGS = [
    # metrics
    ("metrics: eta sign", "overlap_bench/metrics.py", "return (t_base - t) / room", "return (t - t_base) / room", NUM),
    ("metrics: busbw (n-1)/n", "overlap_bench/metrics.py", "algbw * 2 * (world - 1) / world",
     "algbw * (world - 1) / world", NUM),
    ("metrics: busbw factor dropped", "overlap_bench/metrics.py", "return algbw * 2 * (world - 1) / world",
     "return algbw", NUM),
    ("metrics: FLOP count M*K*N", "overlap_bench/metrics.py", "2.0 * m * k * n", "1.0 * m * k * n", NUM),
    ("metrics: ideal = min", "overlap_bench/metrics.py", "return max(t_gemm, t_comm)", "return min(t_gemm, t_comm)",
     NUM),
    ("metrics: tokens/s per ms", "overlap_bench/metrics.py", "return m / (t_ms * 1e-3)", "return m / t_ms", NUM),
    ("metrics: speedup inverted", "overlap_bench/metrics.py", "return t_base / t if", "return t / t_base if", NUM),
    ("metrics: busbw bytes fixed at 2", "overlap_bench/metrics.py", "m * n * dtype_bytes(dtype)", "m * n * 2", NUM),
    # timing
    ("timing: median -> mean", "overlap_bench/timing.py", "[statistics.median(samples)",
     "[statistics.mean(samples)", TIMING),
    ("timing: max over ranks -> min", "overlap_bench/timing.py", "op=dist.ReduceOp.MAX", "op=dist.ReduceOp.MIN",
     TIMING),
    ("timing: IQR q3 - median", "overlap_bench/timing.py", "return q[2] - q[0]", "return q[2] - q[1]", TIMING),
    ("timing: IQR exclusive quartiles", "overlap_bench/timing.py", 'method="inclusive"', 'method="exclusive"',
     TIMING),
    ("timing: counts not agreed", "overlap_bench/timing.py",
     "warmup, reps = (int(v) for v in allreduce_max([warmup, reps], group, device))", "pass", TIMING),
    ("timing: warm-up calls timed", "overlap_bench/timing.py", "    for _ in range(warmup):\n        fn()\n",
     "", TIMING),
    ("timing: NaN lost in max", "overlap_bench/timing.py", "t.masked_fill(nan, -math.inf)", "t", TIMING),
    # numerics
    ("numerics: tolerances x100", "overlap_bench/numerics.py",
     '{"float32": 1e-5, "float16": 5e-3, "bfloat16": 2e-2}', '{"float32": 1e-3, "float16": 5e-1, "bfloat16": 2.0}',
     NUM),
    ("numerics: NaN passes", "overlap_bench/numerics.py", "return err <= TOLERANCE[dtype]",
     "return not err > TOLERANCE[dtype]", NUM),
    ("numerics: rel_err over ||y||", "overlap_bench/numerics.py", "ref = y_base.double()", "ref = y.double()", NUM),
    ("numerics: rel_err of this rank only", "overlap_bench/bench.py",
     "e = allreduce_max([rel_err(y, y_base)], None, ctx.device)[0]", "e = rel_err(y, y_base)", NUM),
    # records and resume
    ("records: key loses env", "overlap_bench/records.py", "tuple(sorted(env.items())), world", "(), world",
     RESUME),
    ("records: key loses bias", "overlap_bench/records.py", "return (shape, K, N, M, dtype, bool(bias),",
     "return (shape, K, N, M, dtype, False,", RESUME),
    ("resume: sweep key loses env", "overlap_bench/sweep.py", "c.label, c.env_dict, spec.world_size",
     "c.label, {}, spec.world_size", RESUME),
    ("resume: sweep key loses bias", "overlap_bench/sweep.py", "c.M, c.dtype, c.bias, c.label",
     "c.M, c.dtype, False, c.label", RESUME),
    ("records: null not read back as NaN", "overlap_bench/records.py",
     "(math.nan if k in floats and v is None else v)", "v", RESUME),
    ("bench: speedup from t_gemm", "overlap_bench/bench.py", "t_ms=t.median_ms, t_base_ms=t_base.median_ms,",
     "t_ms=t.median_ms, t_base_ms=t_gemm.median_ms,", RESUME),
    ("bench: busbw of world 1", "overlap_bench/bench.py", "n=case.N, dtype=case.dtype, world=ctx.world,",
     "n=case.N, dtype=case.dtype, world=1,", RESUME),
    # stats
    ("stats: faster reads the CI's high end", "overlap_bench/stats.py", "if p < alpha and lo > 1",
     "if p < alpha and hi > 1", STATS),
    ("stats: slower reads the CI's low end", "overlap_bench/stats.py", "elif p < alpha and hi < 1",
     "elif p < alpha and lo < 1", STATS),
    ("stats: p-value ignored", "overlap_bench/stats.py", "if p < alpha and lo > 1", "if lo > 1", STATS),
    ("stats: speedup a over b", "overlap_bench/stats.py", "speedup = float(b.mean() / a.mean())",
     "speedup = float(a.mean() / b.mean())", STATS),
    ("stats: median is a mean", "overlap_bench/stats.py", "median_b=float(np.median(b))",
     "median_b=float(np.mean(b))", STATS),
    ("stats: std ddof 0", "overlap_bench/stats.py", "x.std(ddof=1)", "x.std(ddof=0)", STATS),
    ("stats: geomean arithmetic", "overlap_bench/stats.py", "np.exp(np.log(arr).mean())", "arr.mean()", STATS),
    # strategies / splits
    ("splits: edges halves only the first", "overlap_bench/strategies/pipeline.py",
     "weights[0] = weights[-1] = 0.5", "weights[0] = 0.5", SPLIT),
    ("splits: geo shrinks instead of grows", "overlap_bench/strategies/pipeline.py",
     "weights = [ratio ** i for i in range(chunks)]", "weights = [ratio ** -i for i in range(chunks)]", SPLIT),
    ("splits: last row dropped", "overlap_bench/strategies/pipeline.py", "    edges.append(m)\n",
     "    edges.append(m - 1)\n", SPLIT),
    ("splits: align floors", "overlap_bench/strategies/pipeline.py", "round(edge / align) * align",
     "int(edge / align) * align", SPLIT),
    ("chunked: baseline at M == threshold", "overlap_bench/strategies/chunked.py", "if m < settings.threshold:",
     "if m <= settings.threshold:", SPLIT),
    ("pr: baseline at M == 16384", "overlap_bench/strategies/pr.py", "if m < PR_THRESHOLD:",
     "if m <= PR_THRESHOLD:", SPLIT),
    ("strategies: bias on every rank", "overlap_bench/strategies/pipeline.py",
     "if bias is None or dist.get_rank(group) != 0:", "if bias is None:", SPLIT),
    # analysis / selection
    ("analysis: reference = slower baseline", "overlap_bench/analysis.py", "return min(cands) if cands",
     "return max(cands) if cands", SEL),
    ("analysis: reference = strategy's t_base only", "overlap_bench/analysis.py",
     "for rec, t_col, iqr_col in ((win, \"t_base_ms\", \"t_base_iqr_ms\"), (base_rec, \"t_ms\", \"t_iqr_ms\")):",
     "for rec, t_col, iqr_col in ((win, \"t_base_ms\", \"t_base_iqr_ms\"),):", SEL),
    ("analysis: spread not halved", "overlap_bench/analysis.py",
     "if not win[\"t_ms\"] + _num(win[\"t_iqr_ms\"], 0.0) / 2 < ref - ref_iqr / 2:",
     "if not win[\"t_ms\"] + _num(win[\"t_iqr_ms\"], 0.0) < ref - ref_iqr:", SEL),
    ("analysis: tie within spread wins", "overlap_bench/analysis.py",
     "if not win[\"t_ms\"] + _num(win[\"t_iqr_ms\"], 0.0) / 2 < ref - ref_iqr / 2:",
     "if not win[\"t_ms\"] + _num(win[\"t_iqr_ms\"], 0.0) / 2 <= ref - ref_iqr / 2:", SEL),
    ("analysis: first measurement wins", "overlap_bench/analysis.py", 'subset=_CASE, keep="last"',
     'subset=_CASE, keep="first"', SEL),
    ("analysis: speedup vs winner's own t_base", "overlap_bench/analysis.py", "speedup=ref / win[\"t_ms\"]",
     "speedup=win[\"t_base_ms\"] / win[\"t_ms\"]", SEL),
    # policy
    ("export: slower winner kept on shared (K, N)", "overlap_bench/export.py",
     'g.sort_values("speedup", ascending=False', 'g.sort_values("speedup", ascending=True', SEL),
    ("policy: lookup takes the bucket below at M == bucket", "overlap_bench/policy.py",
     "i = bisect.bisect_right(shape.ms, M) - 1", "i = bisect.bisect_left(shape.ms, M) - 1", SEL),
    ("export: env picked by slowest", "overlap_bench/export.py", "chosen = min(keys, key=lambda k: (scores[k]",
     "chosen = max(keys, key=lambda k: (scores[k]", SEL),
]


def main(ids: list[str]) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="planted-"))
    tree = scratch / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "__pycache__", ".hypothesis", "results",
                                                             ".pytest_cache", ".stage"))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    rows = []
    try:
        for i, (name, rel, old, new, tests) in enumerate(BUGS):
            if ids and str(i) not in ids:
                continue
            path = tree / rel
            text = (ROOT / rel).read_text()
            if text.count(old) != 1:
                rows.append((i, name, "stale", f"{text.count(old)} matches in {rel}"))
                continue
            path.write_text(text.replace(old, new))
            try:
                res = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *tests],
                                     cwd=tree, env=env, capture_output=True, text=True, timeout=900)
            finally:
                path.write_text(text)
            failed = re.findall(r"^FAILED (\S+)", res.stdout, re.M)
            rows.append((i, name, "caught" if res.returncode else "MISSED", failed[0] if failed else ""))
            print(f"{i:2d} {rows[-1][2]:7s} {name}: {rows[-1][3]}", flush=True)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
    caught = sum(r[2] == "caught" for r in rows)
    print(f"\n{caught} of {len(rows)} caught")
    print("\n| # | planted bug | result | first failing test |\n| ---: | --- | --- | --- |")
    for i, name, result, test in rows:
        print(f"| {i} | {name} | {result} | `{test}` |")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

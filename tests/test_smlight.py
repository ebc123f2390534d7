"""The SM-light paths on CPU/gloo: comm=symm, comm=ce, gemm_sms, asynctp.

What can be checked without GPUs: settings and the registry, the unavailable records on gloo (the sweep goes
on), the copy-engine exchange's slicing (pure, and its gloo stand-in made of plain collectives against the
baseline), and the reading of NCCL's log.
"""

import json
import os

import pytest
import torch
import torch.distributed as dist
from typer.testing import CliRunner

from overlap_bench import strategies
from overlap_bench.cli import app
from overlap_bench.launch import JobConfig, launch
from overlap_bench.spec import load_spec
from overlap_bench.strategies import nccl_log, symm
from overlap_bench.strategies.asynctp import rows_per_rank
from overlap_bench.strategies.pipeline import all_reduce_bounds, even_bounds

NEW = ["asynctp", "chunked:comm=symm", "chunked:comm=ce", "chunked:gemm_sms=64",
       "chunked:comm=symm,gemm_sms=64,priority=true", "chunked:comm=ce,gemm_sms=120"]


def test_new_paths_are_listed():
    out = CliRunner().invoke(app, ["strategies"], terminal_width=300).output
    assert "asynctp" in out and "gemm_sms" in out and "integer >= 0" in out and "stream, async, symm, ce" in out
    from overlap_bench.strategies.pipeline import COMM_PATHS
    assert {"symm", "ce"} <= set(COMM_PATHS)
    for text in NEW:
        name, s = strategies.parse(text)
        assert strategies.parse(strategies.label(name, s)) == (name, s)


@pytest.mark.parametrize("text,field", [
    ("chunked:gemm_sms=-8", "gemm_sms"), ("chunked:gemm_sms=half", "gemm_sms"), ("chunked:comm=nvls", "comm"),
    ("chunked:comm=multimem", "comm"), ("asynctp:chunks=3", "chunks"),
])
def test_bad_settings_name_the_field(text, field):
    with pytest.raises(ValueError, match=f"'{field}'"):
        strategies.parse(text)


@pytest.mark.parametrize("text,words", [
    ("asynctp", ["asynctp", "NCCL", "gloo"]),
    ("chunked:comm=symm", ["comm=symm", "gloo"]),
    ("chunked:comm=ce", ["comm=ce", "gloo"]),
    ("chunked:gemm_sms=64", ["gemm_sms=64", "green", "gloo"]),
])
def test_unavailable_on_gloo_with_reason(text, words):
    reason = strategies.unavailable_reason(*strategies.parse(text), "gloo")
    assert reason and all(w in reason for w in words), reason


def test_sweep_records_unavailable_and_goes_on(tmp_path):
    spec = {"name": "sm-light-gloo", "backend": "gloo", "world_size": 2, "dtypes": ["float32"],
            "shapes": [{"name": "tiny", "K": 16, "N": 24}], "tokens": [12],
            "strategies": ["baseline", "asynctp", {"name": "chunked", "comm": ["symm", "ce"], "gemm_sms": [0, 8]},
                           {"name": "baseline", "comm": ["symm", "oneshot", "twoshot"]},
                           {"name": "chunked", "chunks": 3}, {"name": "chunked", "gemm_sms": 8}],
            "warmup": 1, "reps": 2, "timeout_s": 60}
    path = tmp_path / "s.yaml"
    path.write_text(json.dumps(spec))
    res = CliRunner().invoke(app, ["sweep", str(path), "--out", str(tmp_path / "run")])
    assert res.exit_code == 0, res.output
    recs = [json.loads(line) for line in (tmp_path / "run" / "records.jsonl").read_text().splitlines()]
    by = {r["label"]: r for r in recs}
    assert by["baseline"]["status"] == "ok" and by["chunked:chunks=3,comm=stream"]["status"] == "ok"
    new = [r for r in recs if r["strategy"] == "asynctp" or r["settings"].get("comm") in ("symm", "ce", "oneshot",
                                                                                         "twoshot")
           or r["settings"].get("gemm_sms")]
    assert len(new) == 9  # the plain references (baseline:comm=...) as well: unavailable, and the sweep went on
    for r in new:
        assert r["status"] == "unavailable" and "gloo" in r["reason"], r
        assert r["note"] is None, r  # a note says how a strategy ran; gemm_sms=8 over comm=stream has one on gloo
    summary = (tmp_path / "run" / "summary.md").read_text()
    assert "**unavailable** `baseline:comm=oneshot`" in summary and "vs best plain equals vs baseline" in summary


def test_ready_sm_light_spec_validates():
    s, _ = load_spec("sweeps/qwen2.5-72b-tp4-sm-light.yaml", backend="gloo")
    labels = s.labels
    for want in ["asynctp", "comm=symm", "comm=ce", "gemm_sms=", "pr", "baseline"]:
        assert any(want in lab for lab in labels), want
    envs = [e for e in s.env]
    assert any(e.get("TORCH_SYMMMEM") == "NCCL" for e in envs) and any("TORCH_SYMMMEM" not in e for e in envs)
    assert any(e.get("CUDA_DEVICE_MAX_CONNECTIONS") == "1" for e in envs)
    assert any("NCCL_SYM_CTAS" in e for e in envs)
    assert all(e.get("NCCL_NVLS_ENABLE", "0") == "0" for e in envs)
    # asynctp comes before the window paths so that each job runs what its backend allows, in a fixed order.
    assert labels.index("asynctp") < min(i for i, lab in enumerate(labels) if "comm=symm" in lab)
    full, _ = load_spec("sweeps/qwen2.5-72b-tp4.yaml", backend="gloo")
    assert "asynctp" in full.labels and any("comm=ce" in lab for lab in full.labels)


# -- the copy-engine exchange: pure slicing ---------------------------------------------------------------------

def simulate_ce(parts: list[torch.Tensor]) -> list[torch.Tensor]:
    """What :func:`symm.ce_all_reduce` leaves on each rank, computed without a process group."""
    world = len(parts)
    size = symm.slice_len(parts[0].numel(), world)
    flats = [p.reshape(-1) for p in parts]
    # all-to-all: rank r receives slice r of every rank's chunk, in rank order.
    received = [torch.cat([flats[j][r * size:(r + 1) * size] for j in range(world)]) for r in range(world)]
    summed = [received[r].view(world, size).sum(0) for r in range(world)]
    gathered = torch.cat(summed)  # all-gather: slice r comes from rank r
    return [gathered.view_as(parts[0]).clone() for _ in range(world)]


@pytest.mark.parametrize("world", [1, 2, 3, 4])
def test_simulated_exchange_sums_every_rank(world):
    g = torch.Generator().manual_seed(world)
    parts = [torch.randn(6, 4 * 3, generator=g, dtype=torch.float64) for _ in range(world)]
    want = sum(parts)
    for got in simulate_ce(parts):
        torch.testing.assert_close(got, want)


def test_slices_must_split_evenly():
    assert symm.slice_len(24, 4) == 6
    with pytest.raises(ValueError, match="equal slices"):
        symm.slice_len(10, 4)
    symm.check_chunks([(0, 3), (3, 5)], 8, 4)  # 3x8 and 2x8 elements split into 4
    with pytest.raises(ValueError, match="3 equal slices"):
        symm.check_chunks([(0, 3), (3, 5)], 8, 3)  # 2 rows x 8 = 16 does not


def test_asynctp_rows_must_split_evenly():
    assert rows_per_rank(12, 4) == 3
    with pytest.raises(ValueError, match="multiple of the world size 4"):
        rows_per_rank(10, 4)


def _standin(ctx):
    """The copy-engine exchange built from gloo's plain collectives, in the chunk pipeline, against baseline
    (a rank that finds a difference raises, which fails the job with that rank's message)."""
    ran = 0
    for m, k, n, chunks in [(12, 8, 6, 3), (10, 4, 12, 4), (7, 5, 6, 2), (9, 4, 5, 2)]:
        g = torch.Generator().manual_seed(100 + ctx.rank)
        x, w = torch.randn(m, k, generator=g), torch.randn(n, k, generator=g)
        b = torch.randn(n, generator=torch.Generator().manual_seed(5))
        y_base = strategies.run("baseline", x, w, b, None, strategies.make_settings("baseline"))
        bounds = even_bounds(m, chunks)
        try:
            symm.check_chunks(bounds, n, ctx.world)
        except ValueError:
            continue  # that shape does not split at this world size: refused before any collective
        scratch = torch.empty(max(e - s for s, e in bounds), n)
        y = all_reduce_bounds(torch.empty(m, n), x, w, b, None, bounds, "ce", None,
                              reduce_chunk=lambda c, grp: symm.ce_all_reduce(c, grp or dist.group.WORLD, scratch))
        torch.testing.assert_close(y, y_base, rtol=1e-5, atol=1e-5, msg=lambda e: f"m={m} chunks={chunks}: {e}")
        ran += 1
    assert ran >= 3, f"only {ran} shapes ran the exchange"


@pytest.mark.parametrize("world", [2, 3])
def test_gloo_standin_of_ce_matches_baseline(world):
    launch(_standin, (), JobConfig(nproc=world, backend="gloo", timeout_s=60))


# -- reading NCCL's log ----------------------------------------------------------------------------------------

H = "host:1:2 [0] NCCL INFO "
COLL = H + "{name}: opCount 0 sendbuff 0x1 recvbuff 0x1 count {count} datatype 9 op 0 root 0 comm 0x2 [nranks={n}] stream 0x3"


def test_classify_each_path():
    lines = [
        COLL.format(name="AllReduce", count=1024, n=4),
        H + "AllReduce [Symmetric]: 2048 Bytes -> Kernel AllReduce_RSxLD_AGxST nchannels 8 nthreads 512 nWorks 1",
        COLL.format(name="AllReduce", count=4096, n=4),
        H + "AllReduce: 8192 Bytes -> Algo RING proto SIMPLE channel{Lo..Hi}={0..23}",
        COLL.format(name="AlltoAll", count=256, n=4),
        H + "Init CE, rank 0 baseUCSymReadyPtr 0x5, baseUCSymComplPtr 0x6, seq num 0",
        COLL.format(name="AllGather", count=256, n=4),
        COLL.format(name="AllReduce", count=16, n=1),
        COLL.format(name="AlltoAll", count=16, n=2),
        H + "Channel 00/0 : 0[0] -> 1[1] via P2P/CUMEM",
    ]
    got = nccl_log.classify(lines)
    assert got == ["AllReduce count=1024: symmetric kernel AllReduce_RSxLD_AGxST on 8 CTAs",
                   "AllReduce count=4096: SM kernel RING/SIMPLE on 24 channels",
                   "AlltoAll count=256: copy engine",
                   "AllGather count=256: no path line",
                   "AllReduce count=16: one-rank local copy",
                   "AlltoAll count=16: SM kernels (send/recv)"]
    assert nccl_log.summary(got[:2] + got[:1]) == ("AllReduce: symmetric kernel AllReduce_RSxLD_AGxST on 8 CTAs; "
                                                 "AllReduce: SM kernel RING/SIMPLE on 24 channels")
    assert nccl_log.summary([]) == "no NCCL collective logged"


def test_capture_without_libnccl_runs_once_and_says_why():
    calls = []
    got = nccl_log.capture(lambda: calls.append(1), lambda: None)
    assert calls == [1]
    assert got.lines == () and "not captured" in got.why


def test_capture_switches_the_log_on_for_one_call_and_restores_the_environment(monkeypatch):
    resets = []

    class FakeNccl:
        def ncclResetDebugInit(self):  # noqa: N802 - libnccl's symbol
            resets.append(1)

    monkeypatch.setattr(nccl_log, "_libnccl", lambda: FakeNccl())
    monkeypatch.setenv("NCCL_DEBUG", "WARN")
    monkeypatch.delenv("NCCL_DEBUG_SUBSYS", raising=False)
    monkeypatch.delenv("NCCL_DEBUG_FILE", raising=False)
    seen = {}

    def call():
        seen.update(debug=os.environ["NCCL_DEBUG"], subsys=os.environ["NCCL_DEBUG_SUBSYS"])
        with open(os.environ["NCCL_DEBUG_FILE"].replace("%p", "1"), "w") as fh:
            fh.write("h:1:1 [0] NCCL INFO AllReduce: opCount 0 sendbuff 0x1 recvbuff 0x1 count 8 datatype 0 "
                     "op 0 root 0 comm 0x2 [nranks=2] stream 0x3\nh:1:1 [0] NCCL INFO unrelated line\n")

    got = nccl_log.capture(call, lambda: None)
    assert seen == {"debug": "INFO", "subsys": "INIT,COLL,TUNING,P2P"} and len(resets) == 2
    assert os.environ["NCCL_DEBUG"] == "WARN" and "NCCL_DEBUG_SUBSYS" not in os.environ
    assert "NCCL_DEBUG_FILE" not in os.environ
    assert len(got.lines) == 1 and nccl_log.classify(got.lines) == ["AllReduce count=8: no path line"]


def test_diagnose_is_on_only_inside_its_block():
    assert not strategies.diagnosing()
    with strategies.diagnose():
        assert strategies.diagnosing()
        with strategies.diagnose():
            assert strategies.diagnosing()
        assert strategies.diagnosing()
    assert not strategies.diagnosing()


def test_asynctp_op_is_found_in_a_fresh_process():
    """torch registers symm_mem ops when its symmetric-memory module is imported; the check must import it
    first (on one H200 the first asynctp case of a job was once reported 'op missing' for that reason)."""
    import subprocess
    import sys

    code = ("from overlap_bench.strategies.asynctp import _check, NoSettings; "
            "print(_check('nccl', NoSettings()))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "lacks" not in out.stdout, out.stdout


def test_nanobatch_split_refuses_sm_light_settings():
    """Nano-batches issue the all-reduces themselves on plain buffers: a window path or a green context would
    silently become the plain path there, so the split refuses them (below the threshold: one range)."""
    for text in ["chunked:comm=symm", "chunked:comm=ce", "chunked:gemm_sms=64"]:
        name, s = strategies.parse(text)
        with pytest.raises(strategies.StrategyUnavailable, match="no plain row split"):
            strategies.get(name).split(64, s)
    name, s = strategies.parse("chunked:comm=symm,threshold=128")
    assert strategies.get(name).split(64, s).bounds == ((0, 64),)
    assert strategies.get("chunked").split(64, strategies.parse("chunked:chunks=2")[1]).comm == "stream"

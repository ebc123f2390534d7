"""Analysis (best setting, threshold, tables), policy export/load/lookup, and the row-parallel layer."""

from __future__ import annotations

import copy
import json
import logging

import pandas as pd
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import yaml

from overlap_bench import export, policy, report, select, strategies
from overlap_bench.keys import Env
from overlap_bench.records import Record, load_records
from overlap_bench.runfolder import RunFolder

CMC = {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}


def rec(M, label, t, t_base, iqr=0.0, base_iqr=0.0, *, shape="s", K=512, N=1024, dtype="bfloat16", world=2,
        env=None, status="ok", device="NVIDIA H100 80GB HBM3") -> Record:
    name, settings = strategies.parse(label)
    return Record(shape=shape, K=K, N=N, M=M, dtype=dtype, world=world, backend="nccl", device=device,
                  strategy=name, settings=strategies.settings_dict(settings), label=strategies.label(name, settings),
                  env=dict(env or {}), status=status, t_ms=t, t_iqr_ms=iqr, t_base_ms=t_base, t_base_iqr_ms=base_iqr,
                  speedup=t_base / t, eta=0.5, rel_err=1e-6)


def sweep(env=None, dtype="bfloat16", fast=1.0, **kw) -> list[Record]:
    """Three Ms: overlap loses at 1024, wins at 4096 (chunks=2) and 16384 (chunks=4)."""
    out = []
    for M, tb, best in [(1024, 1.0, "chunked:chunks=2"), (4096, 4.0, "chunked:chunks=2"),
                        (16384, 16.0, "chunked:chunks=4")]:
        out.append(rec(M, "baseline", tb, tb, env=env, dtype=dtype, **kw))
        if M == 1024:
            out.append(rec(M, best, 1.2, tb, env=env, dtype=dtype, **kw))
        else:
            out.append(rec(M, best, tb * 0.8 / fast, tb, env=env, dtype=dtype, **kw))
            out.append(rec(M, "chunked:chunks=8", tb * 0.9, tb, env=env, dtype=dtype, **kw))
    return out


def write_run(path, records, env_json=None):
    w = RunFolder(path)
    for r in records:
        w.append(r)
    if env_json is not None:
        (path / "env.json").write_text(json.dumps(env_json))
    return path


# ------------------------------------------------------------------------------------------- analysis

def test_best_and_spread_rule():
    recs = [rec(64, "baseline", 1.00, 1.00, 0.02, 0.02),
            # faster on the median but inside the spread: falls back to baseline
            rec(64, "chunked:chunks=2", 0.97, 1.00, 0.04, 0.04),
            rec(128, "baseline", 2.00, 2.00, 0.02, 0.02),
            rec(128, "chunked:chunks=2", 1.70, 2.00, 0.04, 0.04),
            rec(128, "chunked:chunks=4", 1.50, 2.00, 0.04, 0.04, status="failed"),  # failed never wins
            rec(256, "chunked:chunks=2", 3.00, 4.00, 0.1, 0.1)]  # no baseline record at this M
    best = {b.M: b for b in select.best(recs)}
    assert best[64].strategy == "baseline" and best[64].settings == {}
    assert best[64].speedup == 1.0
    assert best[128].label == strategies.label(*strategies.parse("chunked:chunks=2"))
    assert best[128].settings["chunks"] == 2
    assert best[128].t_ms == pytest.approx(1.70) and best[128].t_base_ms == pytest.approx(2.0)
    assert best[256].strategy == "chunked"
    assert select.threshold((m, b.strategy) for m, b in best.items()) == 128


def test_slow_reference_outlier_does_not_make_a_tie_a_win():
    # Seen on a real run: a transient slowed the reference t_base (0.447 ms) but not the baseline strategy's
    # own record (0.2875 ms); a strategy at 0.2865 ms ties the baseline and must not be exported as 1.56x.
    recs = [rec(2048, "baseline", 0.2875, 0.447, 0.004, 0.01),
            rec(2048, "chunked:chunks=2", 0.2865, 0.447, 0.004, 0.01),
            rec(4096, "baseline", 0.52, 0.52, 0.004, 0.004),
            rec(4096, "chunked:chunks=2", 0.47, 0.52, 0.004, 0.004)]
    best = {b.M: b for b in select.best(recs)}
    assert best[2048].strategy == "baseline"
    assert best[2048].speedup == pytest.approx(1.0)
    assert best[2048].t_base_ms == pytest.approx(0.2875)
    assert best[4096].strategy == "chunked"
    assert best[4096].speedup == pytest.approx(0.52 / 0.47)


def test_threshold_cases():
    winners = list(zip([1, 2, 4, 8], ["baseline", "chunked", "baseline", "chunked"]))
    assert select.threshold(winners) == 8
    assert select.threshold(winners[:3]) is None
    assert select.threshold((m, "pr") for m, _ in winners) == 1
    with pytest.raises(ValueError):
        select.threshold(winners + [(8, "baseline")])


def test_env_variants_kept_apart():
    best = select.best(sweep() + sweep(env=CMC))
    assert sorted({b.key.env.text for b in best}) == ["CUDA_DEVICE_MAX_CONNECTIONS=1", "default"]
    assert len([b for b in best if b.key.env == Env(CMC)]) == 3


def test_tables_match_records(tmp_path):
    recs = sweep() + sweep(env=CMC)
    decisions = select.decide(recs)
    rows = report.table_rows(decisions)
    assert {r["env"] for r in rows} == {"CUDA_DEVICE_MAX_CONNECTIONS=1", "default"}
    assert sorted(r["M"] for r in rows if r["best"]) == [1024, 1024, 4096, 4096, 16384, 16384]
    csv_path, md_path = report.write_tables(decisions, tmp_path)
    back = pd.read_csv(csv_path)
    assert list(back.columns) == ["shape", "K", "N", "M", "dtype", "world", "env", "label", "t_base_ms", "t_ms",
                                  "speedup", "eta", "rel_err", "status", "best", "t_plain_ms", "vs_plain", "eta_plain"]
    assert len(back) == len(recs)
    assert back.vs_plain.tolist() == pytest.approx(back.speedup.tolist(), nan_ok=True)  # no plain reference here
    by_key = {(r.env and "CUDA_DEVICE_MAX_CONNECTIONS=1" or "default", r.M, r.label): r for r in recs}
    for row in back.itertuples(index=False):
        r = by_key[(row.env, row.M, row.label)]
        assert (row.t_ms, row.t_base_ms, row.speedup) == (r.t_ms, r.t_base_ms, r.speedup)
    md = md_path.read_text()
    assert md.count("## s |") == 2 and "✓" in md and "**chunked:chunks=4" in md
    assert "overlap wins from M = 4096" in md


def test_run_dir_and_torn_line(tmp_path):
    write_run(tmp_path, sweep())
    with open(tmp_path / "records.jsonl", "a") as fh:
        fh.write('{"shape": "s", "K"')
    assert len(select.score(load_records(tmp_path).records)) == len(sweep())


# ------------------------------------------------------------------------------------------- policy

def test_export_roundtrip_and_lookup(tmp_path, caplog):
    run = write_run(tmp_path / "run", sweep(), {"gpu_name": "NVIDIA H100 80GB HBM3", "torch": "2.13",
                                                 "nccl": "2.21.5", "git_commit": "abc"})
    [path] = export.export_policy(run, tmp_path / "p.yaml", unconfirmed=True)
    doc = yaml.safe_load(path.read_text())
    assert doc["meta"]["world_size"] == 2 and doc["meta"]["torch"] == "2.13" and doc["meta"]["cuda"] is None
    assert doc["meta"]["required_env"] == {} and doc["meta"]["git_commit"] == "abc"
    assert doc["shapes"]["512,1024"]["threshold"] == 4096
    assert sorted(doc["shapes"]["512,1024"]["buckets"]) == [1024, 4096, 16384]

    p = policy.load_policy(path, expect_world=2, expect_device="NVIDIA_H100_80GB_HBM3")
    c = p.choose(K=512, N=1024, M=4096)
    assert (c.strategy, c.settings.chunks, c.bucket) == ("chunked", 2, 4096)
    assert p.choose(K=512, N=1024, M=4095).strategy == "baseline"  # bucket 1024: baseline won there
    assert p.choose(K=512, N=1024, M=4095).bucket == 1024
    below = p.choose(K=512, N=1024, M=1023)
    assert below.strategy == "baseline" and below.bucket is None and "below" in below.reason
    assert p.choose(K=512, N=1024, M=16383).settings.chunks == 2
    assert p.choose(K=512, N=1024, M=10**6).settings == strategies.make_settings("chunked", {"chunks": 4})
    with caplog.at_level(logging.WARNING, logger="overlap_bench.policy"):
        for _ in range(3):
            assert p.choose(K=7, N=9, M=4096).strategy == "baseline"
    assert len([r for r in caplog.records if "K=7, N=9" in r.getMessage()]) == 1


def test_export_directory_naming_and_env_choice(tmp_path):
    # The CMC variant's winners are faster: it is chosen and recorded as required_env.
    run = write_run(tmp_path / "run", sweep() + sweep(env=CMC, fast=1.5) + sweep(dtype="float16"))
    with pytest.raises(ValueError, match="dtype"):
        export.export_policy(run, tmp_path / "one.yaml")
    paths = export.export_policy(run, tmp_path / "out", unconfirmed=True)
    assert sorted(p.name for p in paths) == [
        "device=NVIDIA_H100_80GB_HBM3,world=2,dtype=bfloat16.yaml",
        "device=NVIDIA_H100_80GB_HBM3,world=2,dtype=float16.yaml"]
    bf16 = yaml.safe_load(paths[0].read_text())
    assert bf16["meta"]["required_env"] == CMC
    assert yaml.safe_load(paths[1].read_text())["meta"]["required_env"] == {}
    [one] = export.export_policy(run, tmp_path / "one.yaml", dtype="bfloat16", env={}, unconfirmed=True)
    assert yaml.safe_load(one.read_text())["meta"]["required_env"] == {}


def test_env_choice_uses_absolute_times_not_own_baseline(tmp_path):
    # A variable that slows everything (baseline 2x, winner 1.8x) shows a bigger speedup against its own
    # slower baseline, yet every winner is slower in absolute time: the default env must be chosen.
    slow = {"NCCL_MAX_NCHANNELS": "4"}
    recs = sweep()
    for M, tb in [(1024, 1.0), (4096, 4.0), (16384, 16.0)]:
        recs.append(rec(M, "baseline", 2 * tb, 2 * tb, env=slow))
        recs.append(rec(M, "chunked:chunks=2", 1.2 * tb, 2 * tb, env=slow))
    run = write_run(tmp_path / "run", recs)
    [path] = export.export_policy(run, tmp_path / "p.yaml", unconfirmed=True)
    assert yaml.safe_load(path.read_text())["meta"]["required_env"] == {}


def test_cpu_device_name(tmp_path):
    run = write_run(tmp_path / "run", sweep(device="cpu"))
    [path] = export.export_policy(run, tmp_path, unconfirmed=True)
    assert path.name == "device=cpu,world=2,dtype=bfloat16.yaml"


GOOD = {"meta": {"device": "cpu", "world_size": 2, "dtype": "float32"},
        "shapes": {"8,6": {"name": "t", "threshold": 1,
                           "buckets": {1: {"strategy": "chunked", "settings": {"chunks": 3}}}}}}


@pytest.mark.parametrize("mutate, field", [
    (lambda d: d.pop("meta"), "meta: is missing"),
    (lambda d: d["meta"].pop("world_size"), "meta.world_size"),
    (lambda d: d["meta"].update(world_size="two"), "meta.world_size"),
    (lambda d: d["shapes"].update({"8x6": d["shapes"].pop("8,6")}), "shapes key '8x6'"),
    (lambda d: d["shapes"]["8,6"].pop("buckets"), "shapes['8,6'].buckets"),
    (lambda d: d["shapes"]["8,6"]["buckets"].update({"x": {"strategy": "baseline"}}), "buckets key 'x'"),
    (lambda d: d["shapes"]["8,6"]["buckets"][1].pop("strategy"), "buckets[1].strategy"),
    (lambda d: d["shapes"]["8,6"]["buckets"][1].update(strategy="nope"), "buckets[1].strategy"),
    (lambda d: d["shapes"]["8,6"]["buckets"][1]["settings"].update(chunks=0), "buckets[1].settings"),
    (lambda d: d["shapes"]["8,6"]["buckets"][1]["settings"].update(bogus=1), "bogus"),
])
def test_malformed_policy_rejected(tmp_path, mutate, field):
    doc = copy.deepcopy(GOOD)
    mutate(doc)
    path = tmp_path / "p.yaml"
    path.write_text(yaml.safe_dump(doc))
    with pytest.raises(policy.PolicyError) as e:
        policy.load_policy(path)
    assert str(path) in str(e.value) and field in str(e.value)


def test_bad_yaml_and_world_mismatch(tmp_path, caplog):
    bad = tmp_path / "bad.yaml"
    bad.write_text("meta: [unclosed\n")
    with pytest.raises(policy.PolicyError, match="malformed YAML"):
        policy.load_policy(bad)
    good = tmp_path / "good.yaml"
    good.write_text(yaml.safe_dump(GOOD))
    with pytest.raises(policy.PolicyError, match="meta.world_size"):
        policy.load_policy(good, expect_world=4)
    with pytest.raises(policy.PolicyError, match="meta.device"):
        policy.load_policy(good, expect_device="NVIDIA H100")
    with caplog.at_level(logging.WARNING, logger="overlap_bench.policy"):
        p = policy.load_policy(good, expect_world=4, fallback=True)
    assert p.choose(K=8, N=6, M=100).strategy == "baseline" and "world_size" in caplog.text


def test_env_dir_wins_over_package_dir(tmp_path, monkeypatch, caplog):
    pkg, override = tmp_path / "pkg", tmp_path / "override"
    name = policy.policy_filename("cpu", 2, "float32")
    for folder, chunks in [(pkg, 2), (override, 5)]:
        folder.mkdir()
        doc = copy.deepcopy(GOOD)
        doc["shapes"]["8,6"]["buckets"] = {1: {"strategy": "chunked", "settings": {"chunks": chunks}}}
        (folder / name).write_text(yaml.safe_dump(doc))
    monkeypatch.setattr(policy, "PACKAGE_DIR", pkg)
    monkeypatch.delenv(policy.ENV_DIR, raising=False)
    assert policy.find_policy("cpu", 2, "float32") == pkg / name
    monkeypatch.setenv(policy.ENV_DIR, str(override))
    assert policy.find_policy("cpu", 2, "float32") == override / name
    assert policy.load_policy_for("cpu", 2, "float32").choose(K=8, N=6, M=9).settings.chunks == 5
    with caplog.at_level(logging.WARNING, logger="overlap_bench.policy"):
        assert policy.find_policy("cpu", 4, "float32") is None
        assert policy.load_policy_for("cpu", 4, "float32").choose(K=8, N=6, M=9).strategy == "baseline"
    assert "world=4" in caplog.text


# ------------------------------------------------------------------------------------------- layer

def _layer_worker(rank: int, world: int, store_path: str, policy_path: str) -> None:
    from overlap_bench.layer import RowParallelLinear

    store = dist.FileStore(store_path, world)
    dist.init_process_group("gloo", store=store, rank=rank, world_size=world)
    try:
        torch.manual_seed(0)
        K, N = 8, 6
        w_full, b = torch.randn(N, K * world), torch.randn(N)
        x_full = torch.randn(2, 5, K * world)  # M = 10 rows, not a multiple of 3
        shard = slice(rank * K, (rank + 1) * K)
        p = policy.load_policy(policy_path, expect_world=world)
        layer = RowParallelLinear.from_weight(w_full[:, shard].contiguous(), b, policy=p)
        y = layer(x_full[..., shard])
        assert layer.last_choice.label.startswith("chunked:chunks=3"), layer.last_choice
        y_base = strategies.run("baseline", x_full[..., shard].reshape(-1, K), w_full[:, shard], b, None,
                                strategies.make_settings("baseline"))
        torch.testing.assert_close(y, y_base.reshape(2, 5, N))
        torch.testing.assert_close(y, x_full @ w_full.T + b)
        assert RowParallelLinear.from_weight(w_full[:, shard], b)(x_full[..., shard]).shape == (2, 5, N)
    finally:
        dist.destroy_process_group()


def test_row_parallel_linear_matches_baseline(tmp_path):
    path = tmp_path / "policy.yaml"
    path.write_text(yaml.safe_dump(GOOD))
    assert policy.load_policy(path).choose(K=8, N=6, M=10).settings.chunks == 3
    mp.spawn(_layer_worker, args=(2, str(tmp_path / "store"), str(path)), nprocs=2, join=True)


def test_shipped_h100_policy_loads_and_answers(monkeypatch):
    monkeypatch.delenv(policy.ENV_DIR, raising=False)
    pol = policy.load_policy_for("NVIDIA H100 80GB HBM3", 4, "bfloat16")
    assert pol.meta["required_env"] == {"CUDA_DEVICE_MAX_CONNECTIONS": "1"}
    assert pol.choose(K=2048, N=8192, M=32768).strategy == "chunked"
    assert pol.choose(K=7392, N=8192, M=1024).strategy == "baseline"  # below the smallest bucket

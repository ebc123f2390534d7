"""Strict config validation: each refusal below is one line naming the field and the fix (a PolicyError or
SpecError, exit 2 on the command line), never a value taken silently, a raw TypeError/OSError or a traceback."""

from __future__ import annotations

import logging
import math

import pytest
import yaml
from typer.testing import CliRunner

from overlap_bench import policy
from overlap_bench.cli import app
from overlap_bench.spec import MIN_CONFIRM_REPEATS, SMOKE, SpecError, load_spec, parse_spec

META = "meta: {device: cpu, world_size: 2, dtype: float32}\n"
SHAPE = "shapes:\n  '8,6': {buckets: {1: {strategy: pr}}}\n"


def load(tmp_path, text: str) -> policy.Policy:
    path = tmp_path / "p.yaml"
    path.write_text(text)
    return policy.load_policy(path)


def refused(tmp_path, text: str, *words: str) -> None:
    with pytest.raises(policy.PolicyError) as info:
        load(tmp_path, text)
    msg = str(info.value)
    assert "\n" not in msg and str(tmp_path / "p.yaml") in msg, msg
    for w in words:
        assert w in msg, msg


def cli_refused(args: list[str], *words: str) -> None:
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2 and isinstance(res.exception, SystemExit), (res.output, res.exception)
    assert len(res.output.strip().splitlines()) == 1 and "Traceback" not in res.output, res.output
    for w in words:
        assert w in res.output, res.output


# ------------------------------------------------------------------------------------------------ spec


def test_confirm_repeats_below_the_floor_is_refused_in_the_spec_and_on_the_command_line(tmp_path):
    assert MIN_CONFIRM_REPEATS == 7 and parse_spec({**SMOKE, "confirm_repeats": 7}).confirm_repeats == 7
    for bad in (6, 1, 0):
        with pytest.raises(SpecError, match=r"^confirm_repeats: must be >= 7, got .*false ships under 1%"):
            parse_spec({**SMOKE, "confirm_repeats": bad})
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump(SMOKE))
    cli_refused(["sweep", str(spec), "--confirm-repeats", "6", "--dry-run"], "--confirm-repeats: must be >= 7")
    # more candidates, a smaller tail each: 7 repeats cannot resolve 17 leaders and pr
    cli_refused(["sweep", str(spec), "--confirm-top", "17", "--dry-run"], "--confirm-repeats: 7 cannot resolve",
                "give 8 or more")
    assert CliRunner().invoke(app, ["sweep", str(spec), "--confirm-top", "16", "--dry-run"]).exit_code == 0


def test_a_key_given_twice_in_a_spec_file_is_refused(tmp_path):
    spec = tmp_path / "s.yaml"
    text = yaml.safe_dump(SMOKE, sort_keys=False)
    spec.write_text(text + "reps: 7\n")  # PyYAML would keep the last reps silently
    with pytest.raises(SpecError, match=r"^SPEC: .*line \d+.*duplicate key 'reps'"):
        load_spec(spec)
    spec.write_text(text.replace("  K: 128\n", "  K: 128\n  K: 64\n", 1))  # nested: inside a shape
    with pytest.raises(SpecError, match="duplicate key 'K'"):
        load_spec(spec)


# ------------------------------------------------------------------------------------------------ policy files


@pytest.mark.parametrize("world", ["0", "-2", "'2'", "true", "2.0"])
def test_policy_world_size_must_be_a_positive_integer(tmp_path, world):
    refused(tmp_path, META.replace("world_size: 2", f"world_size: {world}") + SHAPE, "meta.world_size: must be")


def test_policy_dtype_must_be_one_the_layer_serves(tmp_path):
    for dtype in ("float32", "float16", "bfloat16"):
        assert load(tmp_path, META.replace("float32", dtype) + SHAPE).meta["dtype"] == dtype
    refused(tmp_path, META.replace("float32", "int8") + SHAPE, "meta.dtype: unknown dtype 'int8'", "bfloat16")


@pytest.mark.parametrize("threshold", ["-1", "1.5", "'64'"])
def test_policy_threshold_must_be_a_non_negative_integer(tmp_path, threshold):
    refused(tmp_path, META + SHAPE.replace("{buckets", f"{{threshold: {threshold}, buckets"),
            "shapes['8,6'].threshold: must be")


@pytest.mark.parametrize("key", ["-128,0", "0,8", "8,-6", "8,6,1"])
def test_policy_shape_keys_must_be_two_positive_integers(tmp_path, key):
    refused(tmp_path, META + SHAPE.replace("'8,6'", f"'{key}'"), f"shapes key '{key}'", "K,N")


@pytest.mark.parametrize("second", ["'8, 6'", "' 8,6'", "'08,6'"])
def test_the_same_shape_under_two_keys_is_refused(tmp_path, second):
    text = META + SHAPE + SHAPE.splitlines()[1].replace("'8,6'", second) + "\n"
    refused(tmp_path, text, "the same shape as '8,6'")


@pytest.mark.parametrize("text, key", [
    (META + "meta: {device: cpu, world_size: 4, dtype: float32}\n" + SHAPE, "meta"),
    (META.replace("dtype: float32", "dtype: float32, dtype: float16") + SHAPE, "dtype"),
    (META + SHAPE + SHAPE.splitlines()[1] + "\n", "8,6"),
    (META + "shapes:\n  '8,6': {buckets: {1: {strategy: pr}, 1: {strategy: baseline}}}\n", "1"),
    (META + "shapes:\n  '8,6': {buckets: {1: {strategy: chunked, settings: {chunks: 2, chunks: 4}}}}\n", "chunks"),
])
def test_a_key_given_twice_at_any_level_of_a_policy_is_refused(tmp_path, text, key):
    refused(tmp_path, text, "duplicate key", repr(int(key)) if key.isdigit() else repr(key))


def test_buckets_written_out_of_m_order_are_looked_up_by_m(tmp_path):
    pol = load(tmp_path, META + "shapes:\n  '8,6':\n    buckets:\n"
                                "      4096: {strategy: chunked, settings: {chunks: 4}}\n"
                                "      1024: {strategy: pr}\n"
                                "      2048: {strategy: chunked, settings: {chunks: 2}}\n")
    assert [(m, pol.choose(K=8, N=6, M=m).bucket) for m in (512, 1024, 1500, 2048, 3000, 4096, 10**6)] == \
        [(512, None), (1024, 1024), (1500, 1024), (2048, 2048), (3000, 2048), (4096, 4096), (10**6, 4096)]
    assert pol.choose(K=8, N=6, M=3000).label == "chunked:chunks=2,comm=stream"


# ------------------------------------------------------------------------------------------------ lookups


@pytest.mark.parametrize("kw", [dict(M=None), dict(M=math.inf), dict(M=math.nan), dict(M=64.5), dict(M=64.0),
                                dict(M=True), dict(M=-1), dict(K="8"), dict(K=8.0), dict(N=None), dict(K=True)])
def test_choose_refuses_what_is_not_an_integer_in_one_line(tmp_path, caplog, kw):
    pol = load(tmp_path, META + SHAPE)
    args = {"K": 8, "N": 6, "M": 64, **kw}
    with caplog.at_level(logging.WARNING, logger="overlap_bench.policy"), \
            pytest.raises(policy.PolicyError) as info:
        pol.choose(**args)
    name = next(iter(kw))
    assert str(info.value).startswith(f"choose: {name} must be an integer") and "\n" not in str(info.value)
    assert not caplog.records  # refused before anything is logged (a %d of a str would log a traceback)
    with pytest.raises(policy.PolicyError):  # an empty policy refuses the same way
        policy.Policy().choose(**args)


def test_a_policy_dir_the_system_cannot_read_is_one_line(monkeypatch):
    monkeypatch.setenv(policy.ENV_DIR, "/tmp/" + "d" * 300)  # a path component over 255 bytes
    with pytest.raises(policy.PolicyError) as info:
        policy.load_policy_for("cpu", 2, "float32")
    msg = str(info.value)
    assert msg.startswith(f"{policy.ENV_DIR}: cannot look in") and "too long" in msg and "\n" not in msg


# ------------------------------------------------------------------------------------------------ flags


def test_shapes_tp_that_does_not_divide_names_shapes_tp():
    cli_refused(["model", "--preset", "qwen2.5-72b", "--backend", "gloo", "--nproc", "2", "--shapes-tp", "3",
                 "--tokens", "8", "--dtype", "float32"], "--shapes-tp 3", "use a --shapes-tp")


@pytest.mark.parametrize("value, problem", [("nan", "finite"), ("-1", ">= 0"), ("inf", "finite")])
def test_compare_min_effect_must_be_finite_and_not_negative(tmp_path, value, problem):
    cli_refused(["compare", "baseline", "pr", "--min-effect", value, "--out", str(tmp_path / "c")],
                "--min-effect: must be", problem)
    assert not (tmp_path / "c").exists()

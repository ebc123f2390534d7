"""TEST-ONLY fault injection for tests/test_reliability.py, kept out of the production loop.

A test puts this folder first on ``PYTHONPATH`` and sets :data:`FAULT_ENV`; Python then imports this module
at start-up in the launcher and in every rank it spawns, and it wraps ``overlap_bench.bench`` so that:

- ``kill:rank=R:after=N``: rank R SIGKILLs itself right after its N-th recorded case of the job;
- ``hang:rank=R:after=N``: rank R sleeps forever there, while the others go on into the next collective
  and wait in it until the collective timeout.

"Right after the N-th record" is the next call of ``bench.inputs`` or ``bench.check_against_baseline``
(the start of the next group or case, before its first collective), so record N is already written.
"""

from __future__ import annotations

import os
from pathlib import Path

FAULT_ENV = "OVERLAP_BENCH_FAULT"
HERE = str(Path(__file__).resolve().parent)
"""The folder to put first on ``PYTHONPATH``."""


def _parse(text: str) -> tuple[str, int, int]:
    kind, *items = text.split(":")
    try:
        kv = {k: int(v) for k, v in (item.split("=", 1) for item in items)}
    except ValueError:
        kv = {}
    if kind not in ("kill", "hang") or set(kv) != {"rank", "after"}:
        raise ValueError(f"{FAULT_ENV}={text!r}: use kill:rank=R:after=N or hang:rank=R:after=N")
    return kind, kv["rank"], kv["after"]


def _install(text: str) -> None:
    import signal
    import time

    from overlap_bench import bench

    kind, rank, after = _parse(text)
    recorded = [0]
    real_record, real_inputs, real_check = bench._record, bench.inputs, bench.check_against_baseline

    def maybe_fire(ctx) -> None:
        if ctx.rank == rank and recorded[0] == after:
            if kind == "kill":
                os.kill(os.getpid(), signal.SIGKILL)
            while True:  # hang
                time.sleep(3600)

    def record(case, ctx, *a, **k):
        recorded[0] += 1
        return real_record(case, ctx, *a, **k)

    def inputs(case, ctx, *a, **k):
        maybe_fire(ctx)
        return real_inputs(case, ctx, *a, **k)

    def check(name, settings, x, w, b, y_base, dtype, ctx):
        maybe_fire(ctx)
        return real_check(name, settings, x, w, b, y_base, dtype, ctx)

    bench._record, bench.inputs, bench.check_against_baseline = record, inputs, check


if os.environ.get(FAULT_ENV):
    _install(os.environ[FAULT_ENV])

"""Run a check on every rank of a gloo job and fail the test on ANY rank's findings, not only rank 0's.

``check(ctx, *args) -> list[str]`` returns that rank's failures (empty when all is well). Each rank writes its
own list to ``out_dir/rank<R>.json``; :func:`every_rank` then requires one file per rank, every one empty, and
fails naming the rank of each finding. A rank that raises ends the job (``RankFailed``), which fails the test too.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Callable

import pytest

from overlap_bench.launch import JobConfig, RankContext, launch


def _entry(ctx: RankContext, check: Callable[..., list[str]], args: tuple, out_dir: str) -> None:
    found = check(ctx, *args)
    Path(out_dir, f"rank{ctx.rank}.json").write_text(json.dumps([str(f) for f in found]))


def every_rank(check: Callable[..., list[str]], args: tuple, world: int, out_dir: Path,
               timeout_s: float = 60) -> dict[int, Any]:
    """Run ``check`` on ``world`` gloo ranks; ``pytest.fail`` with every rank's findings if any rank has one."""
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("rank*.json"):
        old.unlink()
    launch(_entry, (check, args, str(out_dir)), JobConfig(nproc=world, backend="gloo", timeout_s=timeout_s))
    found = {int(p.stem[4:]): json.loads(p.read_text()) for p in out_dir.glob("rank*.json")}
    assert sorted(found) == list(range(world)), f"ranks that reported: {sorted(found)} of {world}"
    lines = [f"rank {r}: {f}" for r in sorted(found) for f in found[r]]
    if lines:
        pytest.fail("\n".join(lines), pytrace=False)
    return found

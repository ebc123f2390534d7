"""Plant realistic one-line bugs, one at a time, in a scratch copy of the tree and run the tests that should catch
each. Not collected by pytest; run by hand: ``python tests/planted_bugs.py [ID ...]``.

Each bug in ``planted_bugs.yaml`` is ``(bug, file, old, new, tests)``: ``old`` must occur exactly once in ``file``
(else the bug is reported ``stale``: the code moved and the entry needs updating). The table printed at the end says, per bug, whether the
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

import yaml

ROOT = Path(__file__).resolve().parent.parent

BUGS_FILE = Path(__file__).with_suffix(".yaml")


def load_bugs() -> list[tuple[str, str, str, str, list[str]]]:
    """The bugs of ``planted_bugs.yaml`` as ``(name, file, old, new, test files)``."""
    doc = yaml.safe_load(BUGS_FILE.read_text())
    return [(b["bug"], b["file"], b["old"], b["new"], doc["tests"][b["tests"]]) for b in doc["bugs"]]


def main(ids: list[str]) -> int:
    scratch = Path(tempfile.mkdtemp(prefix="planted-"))
    tree = scratch / "tree"
    shutil.copytree(ROOT, tree, ignore=shutil.ignore_patterns(".git", "__pycache__", ".hypothesis", "results",
                                                             ".pytest_cache", ".stage"))
    env = {**os.environ, "PYTHONPATH": str(tree), "OMP_NUM_THREADS": "1"}
    rows = []
    try:
        for i, (name, rel, old, new, tests) in enumerate(load_bugs()):
            if ids and str(i) not in ids:
                continue
            path = tree / rel
            text = path.read_text()  # the scratch copy (restored after each bug), not the live tree
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

"""The README's drop-in layer example runs as written (under torchrun, 2 CPU ranks) and prints what it says;
the layer outside a distributed job refuses in one line."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

from overlap_bench.layer import RowParallelLinear

ROOT = Path(__file__).resolve().parents[1]


def _readme_example() -> tuple[str, list[str]]:
    """The ``# example.py`` code block of README.md and the lines of the ``text`` block that follows it."""
    found = re.search(r"```python\n(# example\.py.*?)```\s*\n(.*?)```text\n(.*?)```", (ROOT / "README.md").read_text(),
                      re.S)
    assert found, "README.md has no '# example.py' block followed by its printed output"
    return found.group(1), found.group(3).splitlines()


def test_the_readme_layer_example_runs_as_written(tmp_path):
    code, promised = _readme_example()
    assert any(": chunked:" in line for line in promised)  # the example exercises the chunked path
    assert promised and all(line.endswith("same as nn.Linear: True") for line in promised)
    (tmp_path / "example.py").write_text(code)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    res = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "example.py"], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr[-3000:]
    assert res.stdout.splitlines() == promised


def test_the_layer_without_a_process_group_says_so_in_one_line():
    assert not dist.is_initialized()
    for make in (lambda: RowParallelLinear(8, 4), lambda: RowParallelLinear.from_weight(torch.zeros(4, 8))):
        with pytest.raises(RuntimeError) as err:
            make()
        msg = str(err.value)
        assert "\n" not in msg and "torchrun" in msg
        assert msg.startswith("RowParallelLinear needs torch.distributed initialised")

"""The package's structure as behaviour (what the serving path imports, how strategies are found,
the top-level cli.py)."""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _run(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]), **env}
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=full, timeout=120)


def test_the_serving_path_imports_no_analysis_stack():
    # A server that loads a policy and builds the drop-in layer must not pay for pandas/matplotlib/scipy
    # (nor the launcher): a regression here is one stray import in policy.py or layer.py.
    res = _run("import sys, overlap_bench.layer, overlap_bench.policy as p\n"
               "p.load_policy_for('cpu', 2, 'float32').choose(K=1, N=1, M=1)\n"
               "heavy = sorted(m for m in ('pandas', 'matplotlib', 'scipy', 'overlap_bench.launch') if m in sys.modules)\n"
               "print(heavy)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[]"


def test_importing_the_layer_loads_no_tooling_and_leaves_nccl_logging_alone():
    # Every strategy registers on import; none may pull in the analysis or CLI stack, and NCCL's log is
    # switched on only by a benchmark's diagnose(), never by importing or serving. torch itself imports
    # unittest(.mock), so for unittest the check is that the layer adds none of it beyond torch's own.
    res = _run("import os, sys, torch, torch.distributed\n"
               "torch_mods = set(sys.modules)\n"
               "before = {k: v for k, v in os.environ.items() if k.startswith('NCCL_')}\n"
               "import overlap_bench.layer\n"
               "from overlap_bench import strategies\n"
               "strategies.get('chunked')\n"
               "heavy = ('pandas', 'rich', 'typer', 'scipy', 'matplotlib', 'unittest')\n"
               "bad = sorted(m for m in set(sys.modules) - torch_mods if m.split('.')[0] in heavy)\n"
               "bad += [m for m in heavy[:-1] if m in sys.modules]\n"
               "after = {k: v for k, v in os.environ.items() if k.startswith('NCCL_')}\n"
               "print(bad, before == after, strategies.diagnosing(), 'overlap_bench.research' in sys.modules)",
               NCCL_DEBUG="WARN")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "[] True False False"
    own = [p.name for p in (ROOT / "overlap_bench").rglob("*.py")
           if re.search(r"^\s*(from|import) unittest", p.read_text(encoding="utf-8"), re.M)]
    assert own == []


def test_the_core_never_imports_the_research_wing():
    # The research wing builds on the core, never the reverse: its commands join the CLI through an entry point.
    bad = []
    for path in (ROOT / "overlap_bench").rglob("*.py"):
        if "research" in path.relative_to(ROOT / "overlap_bench").parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom):  # from overlap_bench import research: overlap_bench.research
                names = [f"{node.module}.{a.name}" for a in node.names]
            else:
                continue
            bad += [f"{path.name}: {n}" for n in names if n.startswith("overlap_bench.research")]
    assert bad == []


def test_the_console_entry_lists_the_research_commands_in_order():
    res = subprocess.run([sys.executable, "-m", "overlap_bench", "--help"], capture_output=True, text=True,
                         timeout=120, env={**os.environ, "PYTHONPATH": str(ROOT), "COLUMNS": "200"})
    assert res.returncode == 0, res.stderr
    names = [m.group(1) for m in re.finditer(r"^│ (\w+) ", res.stdout, re.M)]
    assert names == ["run", "sweep", "compare", "export", "report", "model", "interference", "strategies"], res.stdout


def test_validating_a_spec_does_not_load_the_launcher():
    res = _run("import sys\nfrom overlap_bench.spec import parse_spec, SMOKE\nparse_spec(SMOKE)\n"
               "print('overlap_bench.launch' in sys.modules, 'pandas' in sys.modules)")
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "False False"


def test_a_strategy_is_one_new_file(tmp_path):
    # Discovery, not a list: a module dropped into the strategies package is registered with no other edit.
    pkg = tmp_path / "overlap_bench"
    (pkg / "strategies").mkdir(parents=True)
    src = ROOT / "overlap_bench"
    for f in src.glob("*.py"):
        (pkg / f.name).symlink_to(f)
    for f in (src / "strategies").glob("*.py"):
        (pkg / "strategies" / f.name).symlink_to(f)
    (pkg / "strategies" / "twice.py").write_text(
        "from dataclasses import dataclass\nfrom overlap_bench.strategies import register\n"
        "from overlap_bench.strategies.baseline import baseline\n\n"
        "@dataclass(frozen=True)\nclass S:\n    pass\n\n"
        "@register('twice', S, 'test only')\ndef twice(x, w, b, group, s):\n    return baseline(x, w, b, group, s)\n")
    res = subprocess.run([sys.executable, "-c", "from overlap_bench import strategies\n"
                          "print(strategies.label(*strategies.parse('twice')), 'chunked' in strategies.REGISTRY)"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path,
                         env={**os.environ, "PYTHONPATH": str(tmp_path)})
    assert res.returncode == 0, res.stderr
    assert res.stdout.strip() == "twice True"


def test_top_level_cli_runs_the_same_app_without_install(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    res = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sweep", "--dry-run", "--backend", "gloo"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert res.returncode == 0, res.stderr
    assert "cases on 2 ranks (gloo)" in res.stdout
    bad = subprocess.run([sys.executable, str(ROOT / "cli.py"), "sweep", "--dry-run", "--tp", "0"],
                         capture_output=True, text=True, timeout=120, cwd=tmp_path, env=env)
    assert bad.returncode == 2 and "--tp" in bad.stderr and "Traceback" not in bad.stderr


def test_readme_layout_names_every_module_and_nothing_points_outside_the_repository():
    root = ROOT
    readme = (root / "README.md").read_text(encoding="utf-8")
    layout = readme[readme.index("## Layout"):readme.index("## Tests")]
    modules = sorted(p.name for p in (root / "overlap_bench").rglob("*.py"))
    assert [m for m in modules if f"`{m}`" not in layout and f"/{m}`" not in layout] == []
    # The design notes live beside the repository, not in it: nothing shipped may send a reader there.
    shipped = [root / "README.md", root / "cli.py", *(root / "overlap_bench").rglob("*.py"),
               *(root / "sweeps").glob("*.yaml")]
    stale = [p.name for p in shipped
             if re.search(r"DESIGN\.md|FINDINGS|\.\./shared", p.read_text(encoding="utf-8"))]
    assert stale == []

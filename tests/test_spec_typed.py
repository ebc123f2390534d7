"""A case carries its strategy's typed settings, and its label (display, keys, the repro
command) says exactly those settings; the spec's defaults are the model's own (no second default in the parser)."""

from __future__ import annotations

from pathlib import Path

import pytest

from overlap_bench import strategies
from overlap_bench.spec import SMOKE, SweepSpec, load_spec, parse_spec

SWEEPS = sorted(Path(__file__).resolve().parents[1].glob("sweeps/*.yaml"))


@pytest.mark.parametrize("path", SWEEPS, ids=lambda p: p.name)
def test_every_committed_case_label_parses_back_to_its_settings(path):
    spec, _ = load_spec(path, backend="gloo", world_size=2)
    for (name, settings), label in zip(spec.strategies, spec.labels):
        assert strategies.parse(label) == (name, settings), label
    case = spec.cases()[-1]
    assert strategies.parse(case.label) == (case.strategy, case.settings)


def test_omitted_fields_take_the_model_defaults():
    required = {name for name, f in SweepSpec.model_fields.items() if f.is_required()}
    spec = parse_spec({k: SMOKE[k] for k in required | {"backend", "world_size"}})
    for name, f in SweepSpec.model_fields.items():
        if name not in required | {"backend", "world_size"}:
            assert getattr(spec, name) == f.get_default(call_default_factory=True), name

"""The selection (:mod:`onnxslim_bn.passes.select`) is a function of the analysis: it writes
nothing into the spaces, layouts or edits, so the same analysis selected twice gives the same
plan (one analysis may serve every latency attempt and sweep point)."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_bn import prune
from onnxslim_bn.app import pipeline
from onnxslim_bn.options import PruneOptions
from tests.fixtures import path


def _state(analysis) -> tuple:
    spaces = [(s.id, s.size, list(s.producers), list(s.coupled), list(s.blocked), list(s.parts), s.groups,
               [(x.node, x.kind, x.offset, x.values.tobytes()) for x in s.sources]) for s in analysis.spaces]
    return (spaces, list(analysis._parent), list(analysis._offset), dict(analysis.layouts), list(analysis.edits),
            list(analysis.consumers), list(analysis.selectors))


@pytest.mark.parametrize("name, ratio, macs", [("resnet", 0.3, None), ("preresnet", 0.3, None),
                                               ("mobilenetv2", None, 0.6), ("densenet", None, 0.5)])
def test_select_leaves_the_analysis_as_it_found_it(monkeypatch, name, ratio, macs):
    select, seen = pipeline.select, []

    def twice(analysis, options, curves=None):
        before = _state(analysis)
        first, second = select(analysis, options, curves), select(analysis, options, curves)
        assert _state(analysis) == before
        assert first.kept.keys() == second.kept.keys()
        assert all(np.array_equal(first.kept[r], second.kept[r]) for r in first.kept)
        assert first.summary() == second.summary() and first.notes == second.notes
        seen.append(first)
        return first

    monkeypatch.setattr(pipeline, "select", twice)
    prune(str(path(name)), PruneOptions(ratio=ratio, target_macs=macs, verify=False))
    assert seen and seen[0].chosen > 0

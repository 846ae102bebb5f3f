"""Identity by object, and importance passes that return what they find (issue 20).

Graph nodes are unhashable and their names are the user's words: structures about them key the
objects (:mod:`onnxslim_bn.ir.ids`). Scale recovery computes its scores and blocks from the
analysis and returns them; only :meth:`Analysis.apply` writes them in.
"""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from onnxslim_bn.ir.fold import fold_constants
from onnxslim_bn.ir.ids import ObjectMap, ObjectSet
from onnxslim_bn.ir.interface import fix_node_names
from onnxslim_bn.ir.shapes import infer_shapes, resolve_input_shapes
from onnxslim_bn.passes.analyse import analyze
from onnxslim_bn.passes.importance import add_data_scores, candidates
from tests.fixtures import path


def test_object_maps_and_sets_key_by_identity_not_by_value():
    a, b = gs.Node("Relu", "same"), gs.Node("Relu", "same")  # equal by value, two nodes
    found = ObjectMap([(a, 1)])
    found[b] = 2
    assert len(found) == 2 and (found[a], found[b]) == (1, 2) and [id(k) for k in found] == [id(a), id(b)]
    del found[a]
    assert a not in found and b in found
    seen = ObjectSet([a, a, b])
    assert len(seen) == 2
    seen.discard(a)
    assert a not in seen and b in seen


def _analysis(name: str, form: str):
    model = onnx.load(str(path(name, form)))
    shapes = infer_shapes(model, resolve_input_shapes(model, None, name)[0], name)
    graph = gs.import_onnx(model)
    fix_node_names(graph)
    fold_constants(graph)
    return analyze(graph, shapes)


def test_scale_recovery_returns_its_scores_and_only_apply_writes_them():
    analysis = _analysis("resnet", "ts-folded")  # every BN folded: the scales come from statistics
    before = [list(s.blocked) for s in analysis.spaces]
    recovery = candidates(analysis)
    assert recovery.found and not any(s.sources for s in analysis.spaces)
    assert [list(s.blocked) for s in analysis.spaces] == before  # found, not yet written in
    analysis.apply(recovery.scores)
    rng = np.random.default_rng(0)
    values = [rng.standard_normal([2, *[d if isinstance(d, int) else 2 for d in analysis.shape(t)[1:]]])
              for _, t, _ in recovery.found]
    scores = add_data_scores(analysis, recovery.found, values)
    assert not any(s.sources for s in analysis.spaces) and not len(analysis.scale_nodes)
    analysis.apply(scores)
    scored = [s for s in analysis.roots() if s.sources]
    assert scored and all(src.node is not None and src.kind == "folded" for s in scored for src in s.sources)
    assert scores.added and all(node in analysis.scale_nodes for *_, node in scores.added)

"""The pipeline (issue 20): one preparation per run, surgery on the graph as analysed and put
back after each attempt, results that no later stage writes into."""

from __future__ import annotations

from dataclasses import FrozenInstanceError, replace

import onnx_graphsurgeon as gs
import pytest

from onnxslim_bn import prune
from onnxslim_bn.app import api
from onnxslim_bn.app import pipeline as stages
from onnxslim_bn.app.api import prune_prepared
from onnxslim_bn.app.pipeline import Pipeline, cut, prepare
from onnxslim_bn.app.sweep import sweep
from onnxslim_bn.ir.values import restored
from onnxslim_bn.options import PruneOptions
from onnxslim_bn.passes.latency import LatencyCurve, layer_shapes
from tests.fixtures import heldout, path


def _exported(graph: gs.Graph) -> bytes:
    return gs.export_onnx(graph, do_type_check=False).SerializeToString()


@pytest.fixture
def prepares(monkeypatch):
    """The preparations made, counted."""
    made = []
    real = stages.prepare

    def counted(*args, **kwargs):
        made.append(args[0])
        return real(*args, **kwargs)

    monkeypatch.setattr(stages, "prepare", counted)
    return made


@pytest.mark.parametrize("name, exact_borders", [("resnet", False), ("resnet", True), ("densenet", False)])
def test_the_graph_is_as_analysed_after_an_attempt(name, exact_borders):
    options = PruneOptions(ratio=0.5, verify=False, exact_borders=exact_borders)
    prep = prepare(str(path(name)), options)
    analysed, nodes = _exported(prep.graph), list(prep.graph.nodes)
    with restored(prep.graph):
        done = cut(prep, options)
        assert _exported(prep.graph) != analysed  # cut: the attempt saw the pruned graph
    assert done.pruned.graph.node and _exported(prep.graph) == analysed
    assert len(prep.graph.nodes) == len(nodes) and all(a is b for a, b in zip(prep.graph.nodes, nodes))
    with restored(prep.graph):  # and a second attempt cuts the same model from it
        again = cut(prep, options)
    assert again.pruned.SerializeToString() == done.pruned.SerializeToString()


def test_an_attempt_that_fails_leaves_the_graph_as_analysed():
    prep = prepare(str(path("vgg")), PruneOptions(verify=False))
    analysed = _exported(prep.graph)
    with pytest.raises(RuntimeError, match="in the middle"):
        with restored(prep.graph):
            cut(prep, PruneOptions(ratio=0.5, verify=False))
            raise RuntimeError("in the middle of an attempt")
    assert _exported(prep.graph) == analysed


def test_runs_on_one_preparation_prune_as_fresh_ones(prepares):
    shared = Pipeline(str(path("resnet")))
    for ratio in (0.3, 0.6, 0.3):
        options = PruneOptions(ratio=ratio, probe=False)
        one = prune_prepared(shared, options)
        fresh = prune(str(path("resnet")), options)
        assert one.model.SerializeToString() == fresh.model.SerializeToString()
        assert one.report.notes == fresh.report.notes and one.report.removed_channels == fresh.report.removed_channels
        ours, theirs = one.report.verification, fresh.report.verification  # the check's reference made once
        assert (ours.max_abs_diff, ours.cosine, ours.inputs) == (theirs.max_abs_diff, theirs.cosine, theirs.inputs)
    assert len(prepares) == 1 + 3  # the shared one once, each fresh run its own


def test_only_options_that_change_the_preparation_prepare_again(prepares):
    shared = Pipeline(str(path("vgg")))
    base = PruneOptions(ratio=0.5, probe=False)
    first = shared.prepared(base)
    for same in (replace(base, ratio=0.2), replace(base, round_to=8), replace(base, max_layer_ratio=0.25),
                 replace(base, ratio=None, target_macs=0.5), replace(base, max_error=1.0)):
        assert shared.prepared(same) is first
    for other in (replace(base, keep=["/fc1/*"]), replace(base, importance="gamma"), replace(base, seed=1)):
        assert shared.prepared(other) is not first
    assert shared.prepared(base) is first  # the others are not kept
    assert len(prepares) == 4
    assert first.notes(base) != first.notes(replace(base, round_to=8))  # the block note follows the run


def test_data_in_memory_prepares_again_only_when_it_is_other_data(prepares):
    images = heldout()[0][:64]
    shared = Pipeline(str(path("vgg")))
    base = PruneOptions(ratio=0.5, data={"input": images}, compensation="bias")
    first = shared.prepared(base)
    assert shared.prepared(replace(base, ratio=0.3)) is first  # the same arrays
    assert shared.prepared(replace(base, data={"input": images.copy()})) is not first  # equal, not the same
    assert len(prepares) == 2


def test_prepared_results_are_frozen():
    prep = prepare(str(path("vgg")), PruneOptions(verify=False))
    with pytest.raises(FrozenInstanceError):
        prep.calibration = None
    with pytest.raises(FrozenInstanceError):
        prep.check = None


def _resolved_table(model, shapes, runtime="onnxruntime", batch=1, threads=None, **_):
    """A layer table that sees every width: time grows with the channels kept."""
    return {n: LatencyCurve([s.c_in // 2, s.c_in], [s.c_out // 2, s.c_out], [[1.0, 2.0], [2.0, 4.0]], block=1)
            for n, s in layer_shapes(model, shapes, batch).items()}


def test_target_latency_attempts_share_one_preparation(prepares, monkeypatch):
    monkeypatch.setattr(api, "layer_latency_table", _resolved_table)
    timed = []
    monkeypatch.setattr(api, "time_pair", lambda a, b, *args, **kw: (timed.append(b), (1.0, 0.9))[1])  # always missed
    shared = Pipeline(str(path("vgg")))
    options = PruneOptions(target_latency=0.8, round_to=1, probe=False)
    result = prune_prepared(shared, options)
    assert len(timed) == 3 and len(prepares) == 1
    assert any("attempt 3" in n for n in result.report.notes)
    assert not any("attempt 2" in n for n in result.report.notes)  # the notes of the attempt kept
    budget = result.report.selection["budget"]
    assert budget["aimed"] == pytest.approx(0.8 * (0.8 / 0.9) ** 2) and budget["measured"] == pytest.approx(0.9)
    assert len({m.SerializeToString() for m in timed}) == 3  # each attempt cut deeper from the same analysis
    assert _exported(shared.prepared(options).graph) == _exported(prepare(str(path("vgg")), options).graph)


def test_sweep_prepares_once(prepares):
    result = sweep(str(path("vgg")), PruneOptions(probe=False), "ratio", [0.2, 0.4, 0.6])
    assert len(prepares) == 1 and [p.error for p in result.points] == [None] * 3
    removed = [p.removed_channels for p in result.points]
    assert removed == sorted(removed) and removed[0] > 0

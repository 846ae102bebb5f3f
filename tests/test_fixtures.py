"""The trained sparse fixtures, pruned end to end and scored on held-out data."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim_bn import prune
from tests.fixtures import DEAD, NAMES, heldout, manifest, path, sparsity
from tests.graphs import run


def accuracy(model) -> float:
    x, y = heldout()
    return float((run(model, {"input": x})[0].argmax(1) == y).mean())


@pytest.mark.parametrize("name", NAMES)
def test_fixture_channels_called_dead_are_dead(name):
    # fixtures/train.py zeroed every gamma below DEAD and measured the predictions
    info = manifest()[name]
    assert info["dead_channels"] > 0.1 * info["bn_channels"]
    assert info["agreement_after_zeroing"] >= 0.99


@pytest.mark.parametrize("name", NAMES)
def test_pruned_at_its_sparsity_keeps_accuracy(name):
    model = onnx.load(str(path(name)))
    ratio = sparsity(name)
    result = prune(model, ratio=ratio, min_channels=1, round_to=1)
    report = result.report
    sel = report.selection  # every channel here has a known replacement: all of them are ranked
    assert sel["ranked"] == report.prunable_channels and sel["kept_unknown_replacement"] == 0
    # the cut at the ratio: every channel below it went, or a constraint held it (nothing replaced it)
    assert report.chosen_channels + sel["kept_by_min_channels"] + sel["kept_by_layer_cap"] \
        + sel["kept_unknown_replacement"] == int(np.floor(ratio * sel["ranked"] + 1e-9))
    # round_to=1: every chosen channel is removed unless a reader BN's branch keeps it
    assert report.removed_channels == report.chosen_channels - sel["kept_by_branches"] + sel["removed_by_branches"] \
        - sel["kept_as_carriers"]
    assert report.after.macs < report.before.macs
    before, after = accuracy(model), accuracy(result.model)
    assert abs(after - before) <= 0.005, (before, after)


@pytest.mark.parametrize("name", NAMES)
def test_dead_channels_with_zero_beta_are_reproduced_exactly(name):
    model = onnx.load(str(path(name)))
    by_name = {t.name: t for t in model.graph.initializer}
    for node in [n for n in model.graph.node if n.op_type == "Identity" and n.input[0] in by_name]:
        # the exporter shares equal BN parameters through Identity nodes: give each BN its own
        copy = numpy_helper.from_array(numpy_helper.to_array(by_name[node.input[0]]), node.output[0])
        model.graph.initializer.append(copy)
        model.graph.node.remove(node)
    by_name = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            gamma, beta = (numpy_helper.to_array(by_name[i]).copy() for i in node.input[1:3])
            dead = np.abs(gamma) < DEAD
            gamma[dead], beta[dead] = 0.0, 0.0
            by_name[node.input[1]].CopyFrom(numpy_helper.from_array(gamma, node.input[1]))
            by_name[node.input[2]].CopyFrom(numpy_helper.from_array(beta, node.input[2]))
    result = prune(model, threshold=DEAD, min_channels=1, round_to=1)
    assert result.report.removed_channels > 0
    x = heldout()[0][:200]
    np.testing.assert_allclose(run(result.model, {"input": x})[0], run(model, {"input": x})[0], atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("ratio", [0.1, 0.3, 0.5, 0.7, 0.9])
def test_ratio_sweep_yields_valid_models(name, ratio):
    # prune() runs the checker, shape inference and onnxruntime, and compares output shapes
    result = prune(str(path(name)), ratio=ratio, round_to=1)
    report = result.report
    assert 0 < report.removed_channels <= ratio * report.prunable_channels + 1
    assert all(s.kept >= min(4, s.channels) for s in report.spaces)
    x = heldout()[0][:8]
    assert run(result.model, {"input": x})[0].shape == (8, 10)


@pytest.mark.parametrize("name", NAMES)
def test_default_rounding_keeps_widths_of_eight(name):
    result = prune(str(path(name)), ratio=0.5)
    for space in result.report.spaces:
        if space.blocked is None and space.channels >= 32:
            assert space.kept % 8 == 0 or space.kept == space.channels, space
    x = heldout()[0][:8]
    assert run(result.model, {"input": x})[0].shape == (8, 10)


def test_keep_pattern_protects_layers_by_node_name():
    protected = "/layers/layers.2/*"
    result = prune(str(path("resnet")), ratio=0.5, round_to=1, keep=[protected])
    by_producer = {p: s for s in result.report.spaces for p in s.producers}
    hit = [s for p, s in by_producer.items() if p.startswith("/layers/layers.2/")]
    assert hit and all(s.kept == s.channels for s in hit)
    assert all("protected by --keep" in s.blocked for s in hit)
    assert result.report.removed_channels > 0  # the rest is still pruned


@pytest.mark.parametrize("name", ["resnet", "densenet"])
def test_dead_channels_with_live_beta_are_exact_at_the_borders_by_default_and_with_exact_borders(name):
    # gamma exactly 0 but beta kept: the removed channels carry constants through padded convs.
    # By default a kept dead channel carries them (select.carriers); --exact-borders adds maps.
    model = onnx.load(str(path(name)))
    by_name = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "BatchNormalization" and node.input[1] in by_name:
            gamma = numpy_helper.to_array(by_name[node.input[1]]).copy()
            gamma[np.abs(gamma) < DEAD] = 0.0
            by_name[node.input[1]].CopyFrom(numpy_helper.from_array(gamma, node.input[1]))
    x = heldout()[0][:100]
    want = run(model, {"input": x})[0]
    rough = prune(model, threshold=DEAD, min_channels=1, round_to=1)
    exact = prune(model, threshold=DEAD, min_channels=1, round_to=1, exact_borders=True)
    held = rough.report.selection["kept_as_carriers"]
    assert exact.report.removed_channels == rough.report.removed_channels + held > held > 0
    assert rough.report.surgery.carried > 0 and exact.report.surgery.border_maps > 0
    assert rough.report.surgery.approximate_layers == exact.report.surgery.approximate_layers == 0
    for result in (exact, rough):
        np.testing.assert_allclose(run(result.model, {"input": x})[0], want, atol=1e-4, rtol=1e-4)

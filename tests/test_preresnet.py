"""The pre-activation ResNet fixture (fixtures/preresnet.py): reader BNs prune their own branch.

Every bottleneck starts with BN -> ReLU -> Conv while the shortcut Add (or a downsample conv)
reads the raw input: those BNs select their branch's channels with a Gather on axis 1 and the
shared tensor stays whole (Network Slimming's channel-selection layer). Measured on the fixture
with its own sparsity (gamma < 1e-3), both the BN-kept and the TorchScript-folded export.
"""

from __future__ import annotations

import json
from functools import cache

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim_bn import inspect, prune
from tests.fixtures import DEAD, FIXTURES, heldout, path
from tests.graphs import run

NAME = "preresnet"
FORMS = ["", "ts-folded"]  # BN kept; BN folded into the convs that precede it (reader BNs stay)
# what the fixture's own sparsity level must at least cut (measured: 47.4% kept, 48.4% folded)
MIN_MAC_CUT = 0.40


def fixture_info() -> dict:
    return json.loads((FIXTURES / f"{NAME}.json").read_text())


@cache
def sparsity(form: str) -> tuple[float, int]:
    """The fixture's sparsity level: the fraction of the ranked (scored) channels below DEAD, and
    how many are ranked. The shared tensors only reader BNs score have no scores of their own."""
    scores = [np.asarray(s.scores) for s in inspect(str(path(NAME, form))).spaces if s.blocked is None and s.scores]
    ranked = sum(len(s) for s in scores)
    return sum(int((s < DEAD).sum()) for s in scores) / ranked, ranked


def reader_bns(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """BNs whose input has another reader too (the shortcut Add or a downsample conv)."""
    readers: dict[str, int] = {}
    for node in model.graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    return [n for n in model.graph.node if n.op_type == "BatchNormalization" and readers[n.input[0]] > 1]


def correct(model: onnx.ModelProto) -> tuple[int, np.ndarray]:
    x, y = heldout()
    top1 = run(model, {"input": x})[0].argmax(1)
    return int((top1 == y).sum()), top1


def out_channels(model: onnx.ModelProto) -> dict[str, int]:
    weights = {t.name: t.dims[0] for t in model.graph.initializer}
    return {n.name: weights[n.input[1]] for n in model.graph.node if n.op_type == "Conv"}


def test_preresnet_channels_called_dead_are_dead():
    # fixtures/preresnet.py zeroed every gamma below DEAD (beta kept) in torch and measured
    info = fixture_info()
    assert info["dead_channels"] > 0.3 * info["bn_channels"]
    assert info["reader_dead_channels"] > 0.3 * info["reader_bn_channels"]  # the branches are sparse too
    assert info["agreement_after_zeroing"] >= 0.99


@pytest.mark.parametrize("form", FORMS)
def test_preresnet_is_pre_activation_in_both_exports(form):
    model = onnx.load(str(path(NAME, form)))
    assert len(reader_bns(model)) == 6  # every block's bn1 shares its input with the shortcut
    assert model.ByteSize() < 1 << 20


@pytest.mark.parametrize("exact_borders", [False, True], ids=["bias", "exact-borders"])
@pytest.mark.parametrize("form", FORMS)
def test_preresnet_pruned_at_its_sparsity_selects_branches_and_keeps_accuracy(form, exact_borders):
    model = onnx.load(str(path(NAME, form)))
    ratio, ranked = sparsity(form)
    result = prune(model, ratio=ratio, min_channels=1, round_to=1, exact_borders=exact_borders)
    report, sel = result.report, result.report.selection
    assert sel["ranked"] == ranked < report.prunable_channels and sel["kept_unknown_replacement"] == 0
    # the cut at the ratio: every channel below it went, or a constraint held it (nothing replaced it)
    assert report.chosen_channels + sel["kept_by_min_channels"] + sel["kept_by_layer_cap"] \
        + sel["kept_unknown_replacement"] == int(np.floor(ratio * sel["ranked"] + 1e-9))
    assert report.removed_channels == report.chosen_channels - sel["kept_by_branches"] + sel["removed_by_branches"] \
        - sel["kept_as_carriers"]
    # a shared tensor with a raw reader (shortcut, downsample conv) loses nothing to the branches
    assert sel["removed_by_branches"] == 0
    assert 1 - report.after.macs / report.before.macs > MIN_MAC_CUT

    # a Gather on axis 1 before the reader BNs whose stream a raw reader sees too (the downsample
    # convs read the streams of stages 1 and 2, which stay whole); stage 3's stream is read by
    # BNs and shortcut Adds only, which end in BNs: those score it together, with no Gather
    gathers = [n for n in result.model.graph.node if n.op_type == "Gather"]
    assert 4 <= len(gathers) < len(reader_bns(model))
    assert all(next(a.i for a in g.attribute if a.name == "axis") == 1 for g in gathers)
    bn_inputs = {n.input[0] for n in result.model.graph.node if n.op_type == "BatchNormalization"}
    assert all(g.output[0] in bn_inputs for g in gathers)
    before, after = out_channels(model), out_channels(result.model)
    for stem in ("/conv1/Conv", "/layers/layers.0/downsample/Conv", "/layers/layers.2/downsample/Conv"):
        assert after[stem] == before[stem], stem
    assert sum(after.values()) < sum(before.values())

    hits_before, top_before = correct(model)
    hits_after, top_after = correct(result.model)
    if exact_borders:
        # measured: -0.3 points (BN kept) and -0.7 (folded: ranked by the recovered scales)
        assert abs(hits_after - hits_before) <= (5 if form == "" else 8), (hits_before, hits_after)
        assert (top_after == top_before).mean() >= 0.985
    else:
        # zero padding meets the removed channels' constants in the 3x3 convs (4x4 maps at the
        # end): a kept constant channel carries them (select.carriers), or the report names the
        # layers left approximate (measured -0.5 / -0.6 points before carriers)
        assert report.surgery.approximate_layers + report.surgery.carried > 0
        assert abs(hits_after - hits_before) <= 10, (hits_before, hits_after)
        assert (top_after == top_before).mean() >= 0.975


def _zero_dead(form: str, zero_beta: bool) -> onnx.ModelProto:
    """The fixture with every BN channel of |gamma| < DEAD set to gamma = 0 (and beta = 0 when
    ``zero_beta``). In the folded export a BN folded into its conv is edited there: the channel's
    weight row becomes 0 and its bias beta (W' = W * s, b' = (b - mean) * s + beta, s = 0)."""
    kept = onnx.load(str(path(NAME)))
    model = onnx.load(str(path(NAME, form)))
    init = {t.name: t for t in model.graph.initializer}
    kept_init = {t.name: numpy_helper.to_array(t) for t in kept.graph.initializer}
    producer = {o: n for n in kept.graph.node for o in n.output}
    nodes = {n.name: n for n in model.graph.node}

    def put(name: str, values: np.ndarray) -> None:
        init[name].CopyFrom(numpy_helper.from_array(values.astype(np.float32), name))

    for bn in (n for n in kept.graph.node if n.op_type == "BatchNormalization"):
        gamma, beta = kept_init[bn.input[1]], kept_init[bn.input[2]].copy()
        dead = np.abs(gamma) < DEAD
        if zero_beta:
            beta[dead] = 0.0
        if bn.name in nodes:  # still a BN node in this export
            target = nodes[bn.name]
            put(target.input[1], np.where(dead, 0.0, gamma))
            put(target.input[2], beta)
        else:  # folded into the conv that produced its input
            conv = nodes[producer[bn.input[0]].name]
            weight = numpy_helper.to_array(init[conv.input[1]]).copy()
            bias = numpy_helper.to_array(init[conv.input[2]]).copy()
            weight[dead], bias[dead] = 0.0, beta[dead]
            put(conv.input[1], weight)
            put(conv.input[2], bias)
    return model


# the zeroed channels score exactly 0; every other channel scores >= 5e-4 (folded) or 1e-3 (kept)
ZEROED = 1e-6


def _prune_zeroed(form: str, zero_beta: bool):
    model = _zero_dead(form, zero_beta)
    return model, prune(model, threshold=ZEROED, min_channels=1, round_to=1, exact_borders=not zero_beta)


@pytest.mark.parametrize("zero_beta", [True, False], ids=["zero-beta", "live-beta"])
@pytest.mark.parametrize("form", FORMS)
def test_preresnet_dead_channels_are_reproduced_exactly(form, zero_beta):
    # gamma = beta = 0: nothing to compensate; gamma = 0 with beta kept: the constants go into
    # the next layers' bias, with the border correction (--exact-borders) in the padded 3x3 convs
    model, result = _prune_zeroed(form, zero_beta)
    assert result.report.removed_channels > 0.25 * result.report.prunable_channels
    assert result.report.selection["removed_by_branches"] == 0  # every shared stream with a raw reader stays
    assert 4 <= sum(n.op_type == "Gather" for n in result.model.graph.node) < len(reader_bns(model))
    x = heldout()[0][:200]
    want, got = run(model, {"input": x})[0], run(result.model, {"input": x})[0]
    assert np.abs(got - want).max() <= 1e-5 * np.abs(want).max()


@pytest.mark.parametrize("zero_beta", [
    # a folded conv whose every channel is dead (weight rows and bias all 0: stage 1's conv1 and
    # conv2) once read as never having had a BN: 269 removed instead of 297
    pytest.param(True, id="zero-beta"),
    pytest.param(False, id="live-beta"),
])
def test_preresnet_folded_export_removes_the_same_dead_channels_as_kept(zero_beta):
    kept, folded = (_prune_zeroed(form, zero_beta)[1].report for form in FORMS)
    assert folded.removed_channels == kept.removed_channels
    assert folded.after.macs == kept.after.macs < 0.6 * kept.before.macs

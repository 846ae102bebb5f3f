"""Faithful by default (issue 16): widths never spend live channels in --ratio / --threshold runs,
a budget's rounding keeps --max-layer-ratio, budgets on narrow layers land near the target, and
zero stays zero through every op whose algebra says so (the table in onnxslim_bn.passes.replacement).

The sparse models here have dead channels with gamma = 0 and live ones with gammas spread over
two decades (0.01 .. 1), as sparsity training leaves them: rounding down past the dead ones would
take the weakest live channels, which carry signal.
"""

from __future__ import annotations

import math

import numpy as np
import onnx
import pytest

from onnxslim_bn import prune
from onnxslim_bn.passes.replacement import ALGEBRA
from tests.graphs import Builder, random_input, run, weight_shapes

EXACT = 1e-5  # of the output's range: float32 through a few layers where the cut is exact


def sparse_bn(b: Builder, x: str, c: int, dead: np.ndarray, beta_dead: float | None = None) -> str:
    out = b.bn(x, c, dead, beta_dead=beta_dead)
    gamma = next(t for t in b.inits if t.name == b.nodes[-1].input[1])
    values = onnx.numpy_helper.to_array(gamma).copy()
    live = np.setdiff1d(np.arange(c), dead)
    values[live] = np.logspace(-2, 0, len(live)).astype(np.float32)[b.rng.permutation(len(live))]
    gamma.CopyFrom(onnx.numpy_helper.from_array(values, gamma.name))
    return out


def sparse_net(widths=(64, 48, 32), dead=(41, 20, 9), seed=0) -> onnx.ModelProto:
    b = Builder(seed=seed)
    x, c = "x", 3
    for w, d in zip(widths, dead):
        x = b.op("Relu", [sparse_bn(b, b.conv(x, c, w), w, b.rng.choice(w, d, replace=False))])
        c = w
    out = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), c, 10)
    return b.model({"x": [2, 3, 8, 8]}, [out])


def rel_diff(model: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    x = random_input([2, 3, 8, 8])
    want, got = run(model, {"x": x})[0], run(pruned, {"x": x})[0]
    return float(np.abs(got - want).max() / np.abs(want).max())


@pytest.mark.parametrize("round_to", [16, 8, "auto"])
def test_ratio_rounding_never_removes_a_channel_the_ranking_kept(round_to):
    model = sparse_net()
    dead = 41 + 20 + 9
    # well inside the dead fraction: the ranking chooses dead channels only
    result = prune(model, ratio=0.8 * dead / (64 + 48 + 32), round_to=round_to, exact_borders=True, verify=False)
    sel = result.report.selection
    assert sel["live_removed"] == 0, sel
    assert sel["max_removed_score"] == 0.0
    assert rel_diff(model, result.model) <= EXACT
    assert result.report.removed_channels > 0
    # what rounding kept is counted, and all of it was dead
    assert sel["kept_by_rounding"] - sel["removed_by_rounding"] + sel["kept_as_carriers"] == \
        result.report.chosen_channels - result.report.removed_channels
    assert sel["dead_kept_by_rounding"] == sel["kept_by_rounding"]
    if sel["kept_by_rounding"] > sel["removed_by_rounding"]:
        assert "rounding widths up" in result.report.table()
    if sel["removed_by_rounding"]:
        assert "all of them dead" in result.report.table()


@pytest.mark.parametrize("min_channels", [8, 16])
def test_ratio_is_a_cut_a_channel_held_below_it_is_not_replaced_by_a_live_one(min_channels):
    # the middle layer is almost all dead (44 of 48): --min-channels holds some of its dead
    # channels, so a ratio at the model's dead fraction cannot take them all. The ratio cuts the
    # ranking there; the dead channels held stay, and no live channel above the cut goes instead.
    widths, dead = (64, 48, 32), (20, 44, 9)
    model = sparse_net(widths, dead, seed=5)
    ratio = sum(dead) / sum(widths)
    result = prune(model, ratio=ratio, round_to=1, min_channels=min_channels, exact_borders=True, verify=False)
    sel = result.report.selection
    held = 44 - (48 - min_channels)
    assert sel["kept_by_min_channels"] == held > 0, sel
    assert sel["live_removed"] == 0 and sel["max_removed_score"] == 0.0, sel
    # every channel below the cut went or is counted as held: the cut at floor(ratio * ranked)
    assert result.report.chosen_channels + sel["kept_by_min_channels"] + sel["kept_by_layer_cap"] \
        + sel["kept_unknown_replacement"] == math.floor(ratio * sel["ranked"] + 1e-9) == sum(dead)
    assert sel["cut"] == {"below": sum(dead), "score": 0.0}, sel
    assert result.report.removed_channels == sum(dead) - held
    assert rel_diff(model, result.model) <= EXACT
    assert "below the cut stay" in result.report.table()


def test_ratio_counts_the_channels_that_cannot_go_as_network_slimming_does():
    # Network Slimming's --ratio is a percentile of every scale factor. Here 6 of the first
    # layer's dead channels have beta 0.7 and feed a squeeze-excitation gate: 0.7 * gate is not a
    # known constant, so they stay. A ratio at the dead fraction of all scored channels must then
    # cut at the dead ones -- a cut over only the channels that can go would reach 6 live ones.
    b = Builder(seed=7)
    w1, w2 = 32, 24
    dead1, dead2 = np.arange(6), np.array([2, 3, 9, 11, 15, 20, 22])
    y = b.bn(b.conv("x", 3, w1), w1, dead1, beta_dead=0.7)
    gamma = next(t for t in b.inits if t.name == b.nodes[-1].input[1])
    values = onnx.numpy_helper.to_array(gamma).copy()
    values[6:] = np.logspace(-2, 0, w1 - 6).astype(np.float32)  # live, spread over two decades
    gamma.CopyFrom(onnx.numpy_helper.from_array(values, gamma.name))
    y = b.op("Relu", [sparse_bn(b, b.conv(_se(b, b.op("Relu", [y]), w1), w1, w2), w2, dead2)])
    out = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [y])], axis=1), w2, 10)
    model = b.model({"x": [2, 3, 8, 8]}, [out])
    ranked = w1 + w2
    ratio = (len(dead1) + len(dead2)) / ranked
    result = prune(model, ratio=ratio, round_to=1, min_channels=1, exact_borders=True, verify=False)
    sel = result.report.selection
    assert sel["ranked"] == ranked and sel["kept_unknown_replacement"] == len(dead1), sel
    assert sel["live_removed"] == 0 and sel["max_removed_score"] == 0.0, sel
    assert result.report.removed_channels == len(dead2)
    assert rel_diff(model, result.model) <= EXACT
    assert "below the cut stay: their value is not a known constant" in result.report.table()


def test_threshold_run_never_removes_a_channel_scored_above_it():
    model = sparse_net(seed=3)
    for threshold in (1e-3, 0.02, 0.05):  # 0.02 and 0.05 lie inside the live gammas
        result = prune(model, threshold=threshold, verify=False)
        sel = result.report.selection
        assert sel["max_removed_score"] is not None and sel["max_removed_score"] < threshold, (threshold, sel)


def test_budget_rounding_keeps_max_layer_ratio():
    # no dead cluster: every channel is live, so --max-layer-ratio 0.75 bounds every layer;
    # rounding to 4 may round down, but never past the cap
    b = Builder(seed=5)
    x, c = "x", 3
    for w in (20, 20, 12):
        x = b.op("Relu", [b.bn(b.conv(x, c, w), w)])
        c = w
    model = b.model({"x": [1, 3, 8, 8]}, [b.conv(x, c, 4, k=1)])
    for target in (0.2, 0.3, 0.5):
        result = prune(model, target_macs=target, round_to=4, min_channels=1, max_layer_ratio=0.75, verify=False)
        shapes = weight_shapes(result.model)
        for name, shape in shapes.items():
            size = weight_shapes(model)[name][0]
            if size != 4:  # the head
                assert shape[0] >= math.ceil(0.25 * size), (target, name, shape)


def test_budget_on_narrow_layers_lands_near_the_target():
    # widths off the machine's block (a small Keras-style CNN): the block of 16 alone cannot come
    # near 80%; finer blocks, and last unrounded widths, must
    b = Builder(seed=7)
    x, c = "x", 3
    for w in (24, 40, 56, 40):
        x = b.op("Relu", [b.bn(b.conv(x, c, w), w)])
        c = w
    model = b.model({"x": [1, 3, 16, 16]}, [b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [x])], axis=1), c, 5)])
    result = prune(model, target_macs=0.8, round_to="auto", verify=False)
    reached = result.report.selection["budget"]["reached"]
    assert 0.8 - 0.021 <= reached <= 0.8, result.report.selection["budget"]


# --- the replacement algebra, row by row ------------------------------------------------------


def _pad(b: Builder, y: str, mode: str, value: float | None = None) -> str:
    inputs = [y, b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))]
    if value is not None:
        inputs.append(b.const(np.float32(value)))
    return b.op("Pad", inputs, mode=mode)


def _se(b: Builder, y: str, c: int) -> str:
    s = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [y]), c, 4, k=1, bias=True)])
    return b.op("Mul", [y, b.op("Sigmoid", [b.conv(s, 4, c, k=1, bias=True)])])


def _depthwise(b: Builder, y: str, c: int, pad: int) -> str:
    return b.conv(y, c, c, k=3, pad=pad, group=c)


# one graph per row of onnxslim_bn.passes.replacement.ALGEBRA: (builder, the row's op applied to y)
BUILD = {
    "relu": lambda b, y, c: b.op("HardSwish", [b.op("LeakyRelu", [b.op("Relu", [y])], alpha=0.1)]),
    "sigmoid": lambda b, y, c: b.op("Sigmoid", [y]),
    "silu": lambda b, y, c: b.op("Mul", [y, b.op("Sigmoid", [y])]),
    "se-gate": lambda b, y, c: _se(b, b.op("Relu", [y]), c),
    "maxpool-padded": lambda b, y, c: b.op("MaxPool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "avgpool": lambda b, y, c: b.op("AveragePool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1]),
    "avgpool-count-pad": lambda b, y, c: b.op("AveragePool", [y], kernel_shape=[3, 3], pads=[1, 1, 1, 1],
                                              count_include_pad=1),
    "pad-zero": lambda b, y, c: _pad(b, y, "constant"),
    "pad-value": lambda b, y, c: _pad(b, y, "constant", 0.5),
    "pad-edge": lambda b, y, c: _pad(b, y, "edge"),
    "resize": lambda b, y, c: b.op("Resize", [y, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="linear"),
    "depthwise-padded": lambda b, y, c: _depthwise(b, y, c, 1),
    "depthwise-valid": lambda b, y, c: _depthwise(b, y, c, 0),
}


def test_every_row_of_the_algebra_has_a_graph():
    assert set(BUILD) == set(ALGEBRA)


def one_op_net(row: str, beta_dead: float) -> tuple[onnx.ModelProto, np.ndarray]:
    """conv -> BN (4 of 12 dead, beta_dead) -> the row's op -> conv 3x3 -> output."""
    b = Builder(seed=11)
    c, dead = 12, np.array([1, 5, 6, 10])
    y = b.bn(b.conv("x", 3, c), c, dead, beta_dead=beta_dead)
    out = b.conv(BUILD[row](b, y, c), c, 4)
    return b.model({"x": [2, 3, 8, 8]}, [out]), dead


@pytest.mark.parametrize("row", list(ALGEBRA))
@pytest.mark.parametrize("beta_dead", [0.0, 0.7])
def test_replacement_algebra_row(row, beta_dead):
    """Each row: the dead channels go exactly where the table says their value is a known constant
    (zero always, c where the op keeps constants), and stay, counted, where it does not."""
    entry = ALGEBRA[row]
    model, dead = one_op_net(row, beta_dead)
    result = prune(model, threshold=1e-6, round_to=1, min_channels=1, exact_borders=True, verify=False)
    removable = entry.zero if beta_dead == 0.0 else entry.constant
    x = random_input([2, 3, 8, 8])
    want, got = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=EXACT * float(np.abs(want).max()))
    sel = result.report.selection
    if removable:
        assert result.report.removed_channels >= len(dead), (row, beta_dead, sel)
    else:
        assert result.report.removed_channels == 0, (row, beta_dead, sel)
        assert sel["kept_unknown_replacement"] == len(dead), sel


# --- never slower, never larger ---------------------------------------------------------------


def test_a_slower_cut_is_replaced_by_a_faster_candidate(monkeypatch):
    """The probe's verdicts are scripted (tests never time): the first cut is 'slower' and blames
    a layer; the tool prunes again keeping that layer whole, re-probes, and keeps the faster cut."""
    from onnxslim_bn.app import api
    from onnxslim_bn.app.bench import Blame, ProbeResult

    model = sparse_net(seed=4)
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    verdicts = iter([ProbeResult(1.0, 1.2, 10, [Blame(first_conv, "Conv", 0.1, 0.3)]), ProbeResult(1.0, 0.8, 10)])
    seen = []

    def fake_probe(original, pruned, feeds, threads=None):
        seen.append(weight_shapes(pruned))
        return next(verdicts)

    monkeypatch.setattr(api, "probe", fake_probe)
    result = prune(model, threshold=1e-3, round_to=1, probe=True, verify=False)
    assert len(seen) == 2
    assert seen[0][first_conv][0] < weight_shapes(model)[first_conv][0]  # the first cut pruned it
    assert weight_shapes(result.model)[first_conv] == weight_shapes(model)[first_conv]  # kept whole
    assert result.report.probe["faster"] and result.report.probe["tried"]
    assert any(n.startswith("probe: the first cut ran 0.83x") for n in result.report.notes)


def test_when_no_candidate_is_faster_the_warning_names_what_was_tried(monkeypatch, caplog):
    from onnxslim_bn.app import api
    from onnxslim_bn.app.bench import Blame, ProbeResult

    model = sparse_net(seed=4)
    first_conv = next(n.name for n in model.graph.node if n.op_type == "Conv")
    monkeypatch.setattr(api, "probe", lambda *a, **k: ProbeResult(1.0, 1.1, 10, [Blame(first_conv, "Conv", 0.1, 0.3)]))
    with caplog.at_level("WARNING"):
        result = prune(model, threshold=1e-3, round_to=1, probe=True, verify=False)
    assert not result.report.probe["faster"]
    assert "also tried: keeping" in caplog.text and "--round-to auto" not in caplog.text


def test_the_exports_own_shape_annotations_give_way_before_the_file_grows():
    # a long chain after the cut, its first tensors annotated in the input (as quant_pre_process
    # leaves a model): the export annotates every tensor, which outweighs the one channel
    # removed; then only the input's own annotations stay, each once
    b = Builder(seed=9)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 8, k=1, pad=0), 8, np.array([3]))])
    for _ in range(24):
        y = b.op("Relu", [y])
    model = b.model({"x": [1, 3, 4, 4]}, [b.conv(y, 8, 2, k=1, pad=0)])
    inferred = onnx.shape_inference.infer_shapes(model).graph.value_info
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred[:12])
    result = prune(model, threshold=1e-6, round_to=1, min_channels=1, verify=False)
    assert result.report.removed_channels == 1
    assert result.model.ByteSize() <= model.ByteSize()
    names = [v.name for v in result.model.graph.value_info]
    assert sorted(names) == sorted(v.name for v in inferred[:12])
    # the report's size row compares serialized sizes, before and after alike
    assert result.report.before.size_bytes == model.ByteSize()
    assert result.report.after.size_bytes == result.model.ByteSize()


def test_a_model_that_lost_almost_nothing_is_not_larger_than_its_input():
    b = Builder(seed=9)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 8, k=1, pad=0), 8, np.array([3]))])
    model = b.model({"x": [1, 3, 4, 4]}, [b.conv(y, 8, 2, k=1, pad=0)])
    result = prune(model, threshold=1e-6, round_to=1, min_channels=1, verify=False)
    assert result.report.removed_channels == 1
    assert result.model.ByteSize() <= model.ByteSize()
    assert ("onnx-bnslim", "pruned") in [(p.key, p.value) for p in result.model.metadata_props] or \
        not result.model.metadata_props

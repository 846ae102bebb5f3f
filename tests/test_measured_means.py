"""With importance from data, a removed channel is replaced at each consumer by its measured
mean, also where the op rules prove no constant (a Pad that writes 1.0 at the border), and
layers without a BN scale are ranked too. Without data the rules decide, and such channels stay."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_bn import BnSlimError, prune
from tests.graphs import Builder, run


def _with_1x1_reader(b: Builder, x: str, channels: int, outputs: int, spatial: int) -> onnx.ModelProto:
    """The model ending in a 1x1 conv (no padding) that reads ``x``."""
    b.op("Conv", [x, b.const(b.rng.standard_normal((outputs, channels, 1, 1)).astype(np.float32) * 0.3, "w"),
                  b.const(np.zeros(outputs, np.float32), "b")], kernel_shape=[1, 1])
    out = b.nodes[-1].output[0]
    return b.model({"input": [None, 3, 8, 8]}, [out], {out: [None, outputs, spatial, spatial]})


def _padded_model() -> tuple[onnx.ModelProto, str]:
    b = Builder(seed=3)
    h = b.op("Relu", [b.bn(b.conv("input", 3, 16), 16)])
    pads = b.const(np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64), "pads")
    padded = b.op("Pad", [h, pads, b.const(np.array(1.0, np.float32), "value")], mode="constant")
    return _with_1x1_reader(b, padded, 16, 8, 10), padded


def _unscaled_model() -> tuple[onnx.ModelProto, str]:
    """conv-bn-relu, then a conv with a bias and no BN (the exporter kept BN elsewhere: this
    layer never had one), then the 1x1 conv reading it."""
    b = Builder(seed=5)
    h = b.op("Relu", [b.bn(b.conv("input", 3, 8), 8)])
    plain = b.conv(h, 8, 16, bias=True)  # no activation after it: not a folded Conv-BN-Act
    return _with_1x1_reader(b, plain, 16, 4, 8), plain


def _samples(seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    return rng.standard_normal((64, 3, 8, 8)).astype(np.float32), rng.standard_normal((32, 3, 8, 8)).astype(np.float32)


def _assert_means_replace(model: onnx.ModelProto, pruned: onnx.ModelProto, tensor: str, removed: np.ndarray,
                          calib: np.ndarray, check: np.ndarray) -> None:
    """The pruned model equals the original with the last 1x1 conv's input channels ``removed``
    held at their calibration means (over samples and positions, padded borders included)."""
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    probe.graph.output.append(onnx.helper.make_empty_tensor_value_info(tensor))
    means = run(probe, {"input": calib})[1].mean(axis=(0, 2, 3))
    out, x = run(probe, {"input": check})
    w = onnx.numpy_helper.to_array(next(t for t in model.graph.initializer
                                        if t.name == model.graph.node[-1].input[1]))[:, :, 0, 0]
    expected = out - np.einsum("oc,nchw->nohw", w[:, removed], x[:, removed] - means[removed, None, None])
    got = run(pruned, {"input": check})[0]
    assert np.abs(got - expected).max() <= 1e-4 * max(1.0, float(np.abs(out).max()))


def test_a_channel_behind_a_pad_of_another_value_is_replaced_by_its_measured_mean():
    model, padded = _padded_model()
    calib, check = _samples(0)
    result = prune(model, ratio=0.25, importance="data", compensation="bias", round_to=1,
                   data={"input": np.concatenate([calib, check])}, calibration_samples=64)
    assert result.report.selection["kept_unknown_replacement"] == 0
    removed = np.array(next(s for s in result.report.spaces if s.channels == 16).removed)
    assert len(removed) == 4
    _assert_means_replace(model, result.model, padded, removed, calib, check)


def test_without_data_the_rules_decide_and_such_channels_stay():
    model, _ = _padded_model()
    result = prune(model, ratio=0.25, importance="gamma", round_to=1)
    assert result.report.removed_channels == 0
    sel = result.report.selection  # all 16 are scored; the 4 below the cut have no replacement the rules prove
    assert sel["ranked"] == 16 and sel["kept_unknown_replacement"] == 4 and sel["chosen"] == 0


def test_with_data_a_layer_without_a_bn_scale_is_ranked_and_replaced_by_its_means():
    model, plain = _unscaled_model()
    gamma = prune(model, ratio=0.25, importance="gamma", round_to=1)
    space = next(s for s in gamma.report.spaces if s.channels == 16)
    assert space.blocked and "no BatchNorm scale" in space.blocked and space.kept == 16
    calib, check = _samples(1)
    result = prune(model, ratio=0.25, importance="data", compensation="bias", round_to=1, keep=["w1"],
                   data={"input": np.concatenate([calib, check])}, calibration_samples=64)
    space = next(s for s in result.report.spaces if s.channels == 16)  # the first conv's 8 stay (--keep)
    assert not space.blocked and space.source == "data" and len(space.removed) > 0
    assert any("without a BatchNorm scale" in n and n.startswith("1 ") for n in result.report.notes)
    _assert_means_replace(model, result.model, plain, np.array(space.removed), calib, check)


def test_a_model_without_any_bn_is_pruned_with_data_and_told_so_without():
    b = Builder(seed=2)
    h = b.op("Relu", [b.conv("input", 3, 16)])
    h = b.op("Relu", [b.conv(h, 16, 16)])
    model = _with_1x1_reader(b, h, 16, 4, 8)
    with pytest.raises(BnSlimError, match="no BatchNormalization node.*pass --data"):
        prune(model, ratio=0.3)
    calib, check = _samples(2)
    result = prune(model, ratio=0.3, round_to=1, data={"input": np.concatenate([calib, check])}, calibration_samples=64)
    assert result.report.options["importance"] == "data" and result.report.removed_channels > 0
    check = result.report.verification  # live channels went: the check measures on samples kept apart
    assert check.disjoint and check.samples == 32, (check.disjoint, check.samples)

"""BN as exporters write it: folded into Conv/Gemm, or split into Mul + Add."""

from __future__ import annotations

import numpy as np
import onnx
import pytest

from onnxslim_bn import BnSlimError, inspect, prune
from tests.fixtures import NAMES, heldout, path, sparsity
from tests.graphs import Builder, random_input, run, weight_shapes

FORMS = ["ts-folded", "dynamo-folded", "dynamo-kept"]


def removed_channels(model, ratio, **kwargs) -> tuple[set, object]:
    """Removed (producer position, channel) pairs; producers matched by graph order."""
    result = prune(model, ratio=ratio, min_channels=1, round_to=1, compensation="bias", exact_borders=True, **kwargs)
    proto = model if isinstance(model, onnx.ModelProto) else onnx.load(str(model))
    order = [n.name for n in proto.graph.node if n.op_type in ("Conv", "Gemm")]
    # a reader BN's branch (its own space, written by the BN): no exporter folds those
    branches = {p for s in result.report.spaces for p in s.producers if p not in order}
    order_bn = [n.name for n in proto.graph.node if n.name in branches]
    removed = set()
    for space in result.report.spaces:
        key = min(order.index(p) if p in order else len(order) + order_bn.index(p) for p in space.producers)
        removed |= {(key, i) for i in space.removed}
    return removed, result


@pytest.fixture(scope="module")
def kept_results():
    return {name: removed_channels(path(name), sparsity(name)) for name in NAMES}


def predictions(model) -> np.ndarray:
    return run(model, {"input": heldout()[0]})[0].argmax(1)


CASES = [(form, data) for form in FORMS for data in ([None, "heldout"] if "folded" in form else [None])]


@pytest.mark.parametrize("form,data", CASES)
@pytest.mark.parametrize("name", NAMES)
def test_export_forms_choose_the_same_channels_and_behave_alike(name, form, data, kept_results):
    base, base_result = kept_results[name]
    data_path = str(path("heldout").with_suffix(".npz")) if data else None
    removed, result = removed_channels(path(name, form), sparsity(name), data=data_path)
    assert len(removed & base) >= 0.95 * len(base), (len(removed & base), len(base))
    kinds = {s.source for s in result.report.spaces if s.blocked is None}
    if form == "dynamo-kept":
        assert kinds == {"bn"}
    else:  # TorchScript folds Conv+BN but leaves BatchNorm1d after a Linear as a node
        assert "folded" in kinds and kinds <= {"bn", "folded"}
    y = heldout()[1]
    original = onnx.load(str(path(name, form)))
    before = (predictions(original) == y).mean()
    after = (predictions(result.model) == y).mean()
    assert abs(after - before) <= 0.005, (before, after)
    agreement = (predictions(result.model) == predictions(base_result.model)).mean()
    assert agreement >= 0.99, agreement


def test_onnxslim_output_prunes_like_the_bn_export(kept_results):
    onnxslim = pytest.importorskip("onnxslim")
    name = "resnet"
    slimmed = onnxslim.slim(str(path(name)))
    assert not any(n.op_type == "BatchNormalization" for n in slimmed.graph.node)
    removed, result = removed_channels(slimmed, sparsity(name))
    base, base_result = kept_results[name]
    assert len(removed & base) >= 0.95 * len(base)
    agreement = (predictions(result.model) == predictions(base_result.model)).mean()
    assert agreement >= 0.99


def split_bn(b: Builder, x: str, c: int, dead: np.ndarray, rank: int = 4) -> str:
    """BN written as TF / Paddle write it: Mul(s) then Add(t), s = gamma / sqrt(var + eps)."""
    gamma = b.rng.uniform(0.5, 1.5, c)
    gamma[dead] = 0.0
    beta, mean, var = b.rng.standard_normal(c) * 0.5, b.rng.standard_normal(c) * 0.1, b.rng.uniform(0.5, 1.5, c)
    s = gamma / np.sqrt(var + 1e-3)
    t = beta - mean * s
    shape = (c, 1, 1) if rank == 4 else (c,)
    y = b.op("Mul", [x, b.const(s.astype(np.float32).reshape(shape))])
    return b.op("Add", [y, b.const(t.astype(np.float32).reshape(shape))])


@pytest.mark.parametrize("opset", [11, 13])
def test_split_bn_mul_add_as_tf_and_paddle_write_it(opset):
    dead = np.array([0, 3, 5])
    b = Builder(opset=opset)
    a = b.op("Clip", [split_bn(b, b.conv("x", 3, 8, bias=True), 8, dead),
                      b.const(np.float32(0.0)), b.const(np.float32(6.0))])  # Relu6 as tf2onnx writes it
    h = b.op("Flatten", [b.op("GlobalAveragePool", [a])], axis=1)
    h = b.op("MatMul", [h, b.const(b.rng.standard_normal((8, 6)).astype(np.float32))])  # Dense + BN
    h = b.op("Relu", [split_bn(b, h, 6, np.array([2]), rank=2)])
    y = b.gemm(h, 6, 3)
    model = b.model({"x": [2, 3, 7, 7]}, [y])
    assert {s.source for s in inspect(model).spaces if s.blocked is None} == {"mul"}
    result = prune(model, ratio=4 / 14, min_channels=1, round_to=1)
    assert result.report.removed_channels == 4
    assert sorted(weight_shapes(result.model).values()) == [[3, 5], [5, 3, 3, 3], [5, 5]]
    x = random_input([2, 3, 7, 7])
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], atol=1e-5, rtol=0)


def test_folded_conv_is_reproduced_when_its_dead_channels_are_exactly_folded():
    # W' = W * s, b' = (b - mean) * s + beta with gamma = 0: W'_c = 0 and b'_c = beta_c
    dead = np.array([1, 2, 6])
    b = Builder()
    x = b.conv("x", 3, 8, bias=True)
    w, bias = (t for t in b.inits[-2:])
    wv, bv = onnx.numpy_helper.to_array(w).copy(), onnx.numpy_helper.to_array(bias).copy()
    wv[dead] = 0.0
    bv[dead] = np.array([0.7, -0.4, 1.1], np.float32)
    w.CopyFrom(onnx.numpy_helper.from_array(wv, w.name))
    bias.CopyFrom(onnx.numpy_helper.from_array(bv, bias.name))
    y = b.conv(b.op("Sigmoid", [x]), 8, 4, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = prune(model, ratio=3 / 8, min_channels=1, round_to=1)
    assert result.report.removed_channels == 3
    assert result.report.spaces[0].source == "folded"
    x = random_input([1, 3, 6, 6])
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], atol=1e-5, rtol=0)


def test_no_bn_and_no_usable_scale_names_the_export_flags():
    b = Builder()
    model = b.model({"x": [1, 3, 5, 5]}, [b.conv(b.op("Relu", [b.conv("x", 3, 4)]), 4, 2)])
    with pytest.raises(BnSlimError) as err:
        prune(model, ratio=0.5)
    message = str(err.value)
    for flag in ("do_constant_folding=False", "optimize=False", "--skip-fuse-bn", "FusionConvBN"):
        assert flag in message


def test_folded_conv_transpose_is_scored_like_a_folded_conv():
    # a UNet decoder exported with BN folded into its ConvTranspose (dynamo's optimizer does it)
    dead = np.array([0, 3])
    b = Builder()
    a = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, np.array([1]), 0.0)])  # 0 into a strided ConvTranspose: exact
    w = b.rng.standard_normal((8, 6, 2, 2)).astype(np.float32) * 0.3
    w[:, dead] = 0.0  # gamma = 0 folded in: the dead output channels have zero columns ...
    bias = (b.rng.standard_normal(6) * 0.2).astype(np.float32)  # ... and output their bias
    up = b.op("ConvTranspose", [a, b.const(w), b.const(bias)], kernel_shape=[2, 2], strides=[2, 2])
    y = b.conv(b.op("Relu", [up]), 6, 3, k=1)
    model = b.model({"x": [1, 3, 4, 4]}, [y])
    result = prune(model, ratio=3 / 14, min_channels=1, round_to=1)
    kinds = {s.producers[0].startswith("ConvTranspose"): s.source for s in result.report.spaces if s.blocked is None}
    assert kinds[True] == "folded"
    assert result.report.removed_channels == 3
    x = random_input([1, 3, 4, 4])
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], atol=1e-5, rtol=0)

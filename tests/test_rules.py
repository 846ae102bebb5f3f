"""Each op rule on a tiny graph: removed channels are dead (gamma = 0), so onnxruntime must
give the same numbers before and after pruning, within 1e-5."""

from __future__ import annotations

import numpy as np
import pytest
from onnx import TensorProto

from onnxslim_bn import BnSlimError, inspect, prune
from onnxslim_bn.rules import RULES, Rule, register
from tests.graphs import Builder, random_input, run, weight_shapes

TOL = 1e-5
RTOL = 1e-6  # float32 rounding on large outputs (Exp)
DEAD = np.array([1, 4, 6])


def assert_same(model, pruned, shape, name="x", seed=1, interior=None):
    x = random_input(shape, seed)
    a, b = run(model, {name: x})[0], run(pruned, {name: x})[0]
    assert a.shape == b.shape
    if interior is not None:
        a, b = a[..., interior:-interior, interior:-interior], b[..., interior:-interior, interior:-interior]
    np.testing.assert_allclose(b, a, atol=TOL, rtol=RTOL)


def prunes_exactly(b: Builder, y: str, shape: list[int], removed: int):
    """Build the model ending in ``y``, prune its dead channels, check count and numbers."""
    model = b.model({"x": shape}, [y])
    result = slim(model)
    assert result.report.removed_channels == removed
    assert_same(model, result.model, shape)
    return result


def slim(model, **kwargs):
    kwargs.setdefault("threshold", 1e-6)
    kwargs.setdefault("min_channels", 1)
    kwargs.setdefault("round_to", 1)
    return prune(model, **kwargs)


def stem(b: Builder, cout=8, dead=DEAD, beta_dead=None):
    """x -> Conv(3->cout) -> BN with `dead` channels at gamma 0."""
    return b.bn(b.conv("x", 3, cout), cout, dead, beta_dead)


UNARY_CASES = [
    ("Relu", {}, 17), ("LeakyRelu", {"alpha": 0.1}, 17), ("Sigmoid", {}, 17), ("HardSigmoid", {}, 17),
    ("HardSwish", {}, 17), ("Tanh", {}, 17), ("Elu", {}, 17), ("Selu", {}, 17), ("Softplus", {}, 17),
    ("Softsign", {}, 17), ("Mish", {}, 18), ("Gelu", {}, 20), ("Erf", {}, 17), ("Abs", {}, 17), ("Neg", {}, 17),
    ("Exp", {}, 17), ("Identity", {}, 17), ("Dropout", {}, 17), ("Cast", {"to": TensorProto.FLOAT}, 17),
]


@pytest.mark.parametrize("op,attrs,opset", UNARY_CASES, ids=[c[0] for c in UNARY_CASES])
def test_activation_passes_channels_and_constant(op, attrs, opset):
    # beta of the dead channels is not zero: the consumer's bias must absorb act(beta)
    b = Builder(opset=opset)
    y = b.conv(b.op(op, [stem(b)], **attrs), 8, 5, k=1)
    model = b.model({"x": [2, 3, 6, 6]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 3
    assert sorted(weight_shapes(result.model).values()) == [[5, 3, 3, 3], [5, 5, 1, 1]]
    assert_same(model, result.model, [2, 3, 6, 6])


def test_every_unary_rule_is_tested():
    from onnxslim_bn.rules.elementwise import UNARY

    assert set(UNARY) == {c[0] for c in UNARY_CASES} | {"Clip"}


@pytest.mark.parametrize("opset", [7, 11, 13])
def test_clip_attribute_and_input_forms(opset):
    b = Builder(opset=opset)
    if opset < 11:
        act = b.op("Clip", [stem(b)], min=0.0, max=6.0)
    else:
        act = b.op("Clip", [stem(b), b.const(np.float32(0.0)), b.const(np.float32(0.5))])
    y = b.conv(act, 8, 4, k=1)
    model = b.model({"x": [1, 3, 5, 5]}, [y])
    assert_same(model, slim(model).model, [1, 3, 5, 5])


@pytest.mark.parametrize("opset", [7, 9, 11, 14, 15])
def test_batchnorm_opsets(opset):
    b = Builder(opset=opset)
    y = b.conv(b.op("Relu", [stem(b)]), 8, 4, k=1)
    prunes_exactly(b, y, [1, 3, 5, 5], removed=3)


def test_padded_consumer_is_exact_at_the_borders_through_a_carrier_and_with_zero_beta():
    # dead channels with beta > 0: a kept dead channel carries their constants (no bias change)
    b = Builder()
    y = b.conv(b.op("Relu", [stem(b, beta_dead=None)]), 8, 4, k=3)
    model = b.model({"x": [1, 3, 8, 8]}, [y])
    result = slim(model)
    assert result.report.surgery.carried == 1 and result.report.surgery.approximate_layers == 0
    assert result.report.selection["kept_as_carriers"] == 1
    assert_same(model, result.model, [1, 3, 8, 8])
    b = Builder()
    y = b.conv(b.op("Relu", [stem(b, beta_dead=0.0)]), 8, 4, k=3)
    model = b.model({"x": [1, 3, 8, 8]}, [y])
    assert_same(model, slim(model).model, [1, 3, 8, 8])


def test_prelu_slope_is_sliced():
    b = Builder()
    slope = b.const(np.linspace(0.1, 0.8, 8, dtype=np.float32).reshape(8, 1, 1))
    y = b.conv(b.op("PRelu", [stem(b), slope]), 8, 4, k=1)
    model = b.model({"x": [1, 3, 5, 5]}, [y])
    result = slim(model)
    assert [list(t.dims) for t in result.model.graph.initializer if list(t.dims) == [5, 1, 1]]
    assert_same(model, result.model, [1, 3, 5, 5])


@pytest.mark.parametrize("op,shape", [("Mul", [8, 1, 1]), ("Add", [1, 8, 1, 1]), ("Sub", []), ("Div", [8, 1, 1]),
                                      ("Max", [1]), ("Min", [8, 1, 1]), ("Pow", [])])
def test_elementwise_with_constant(op, shape):
    b = Builder()
    value = np.random.default_rng(3).uniform(0.5, 2.0, shape).astype(np.float32)
    x = stem(b)
    if op == "Pow":
        x = b.op("Relu", [x])
        value = np.float32(2.0)
    y = b.conv(b.op(op, [x, b.const(value)]), 8, 4, k=1)
    prunes_exactly(b, y, [1, 3, 5, 5], removed=3)


def test_residual_add_merges_spaces_and_removes_only_channels_dead_in_every_bn():
    b = Builder()
    a = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, np.array([1, 2, 5]), None)])
    r = b.bn(b.conv(a, 8, 8), 8, np.array([2, 5, 6]), None)
    y = b.conv(b.op("Relu", [b.op("Add", [a, r])]), 8, 4, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = slim(model)
    # channels 2 and 5: dead in both BNs; one of them stays to carry the other's constant
    assert result.report.removed_channels == 2 - result.report.selection["kept_as_carriers"] == 1
    assert_same(model, result.model, [1, 3, 6, 6])


def test_squeeze_excitation_mul_joins_the_gate():
    b = Builder()
    a = b.op("Relu", [stem(b, beta_dead=0.0)])
    gate = b.op("Sigmoid", [b.conv(b.op("Relu", [b.conv(b.op("GlobalAveragePool", [a]), 8, 4, k=1, bias=True)]),
                                   4, 8, k=1, bias=True)])
    y = b.conv(b.op("Mul", [a, gate]), 8, 4, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 3
    shapes = sorted(map(tuple, weight_shapes(result.model).values()))
    assert shapes == sorted([(5, 3, 3, 3), (4, 5, 1, 1), (5, 4, 1, 1), (4, 5, 1, 1)])
    assert_same(model, result.model, [1, 3, 6, 6])


def test_concat_lays_spaces_end_to_end_and_keeps_graph_inputs():
    b = Builder()
    a = b.op("Relu", [b.bn(b.conv("x", 3, 6), 6, np.array([0, 3]), None)])
    c = b.op("Relu", [b.bn(b.conv("x", 3, 4), 4, np.array([1]), None)])
    y = b.conv(b.op("Concat", [a, "x", c], axis=1), 13, 5, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 3
    assert weight_shapes(result.model)[model.graph.node[-1].name] == [5, 10, 1, 1]
    assert_same(model, result.model, [1, 3, 6, 6])


def test_bn_after_concat_scores_each_segment():
    # DenseNet: a channel goes only when its own BN and the BN after the concat are both ~0
    b = Builder()
    a = b.op("Relu", [b.bn(b.conv("x", 3, 6), 6, np.array([0, 3, 4]), None)])
    c = b.conv("x", 3, 4)  # no BN of its own: ranked by the BN after the concat alone
    joined = b.op("Concat", [a, c], axis=1)
    y = b.conv(b.op("Relu", [b.bn(joined, 10, np.array([0, 3, 7]), None)]), 10, 5, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 3  # 0 and 3 of a, 1 of c
    assert_same(model, result.model, [1, 3, 6, 6])


def test_depthwise_conv_couples_input_and_output():
    b = Builder()
    a = b.op("Relu", [stem(b)])
    d = b.op("Relu", [b.bn(b.conv(a, 8, 8, group=8), 8, DEAD, None)])
    y = b.conv(d, 8, 4, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = slim(model)
    dw = next(n for n in result.model.graph.node if n.op_type == "Conv" and any(a.name == "group" and a.i > 1 for a in n.attribute))
    assert next(a.i for a in dw.attribute if a.name == "group") == 5
    assert_same(model, result.model, [1, 3, 6, 6])


@pytest.mark.parametrize("trans_b", [True, False])
@pytest.mark.parametrize("head", ["Flatten", "Reshape-1", "Reshape-explicit", "Reshape-computed"])
def test_flatten_into_gemm(head, trans_b):
    b = Builder()
    a = b.op("Relu", [b.bn(b.conv("x", 3, 6), 6, np.array([2, 4]), None)])
    if head == "Flatten":
        flat = b.op("Flatten", [a], axis=1)
    elif head == "Reshape-1":
        flat = b.op("Reshape", [a, b.const(np.array([0, -1], np.int64))])
    elif head == "Reshape-explicit":
        flat = b.op("Reshape", [a, b.const(np.array([-1, 96], np.int64))])
    else:  # torch's x.view(x.size(0), -1)
        batch = b.op("Unsqueeze", [b.op("Gather", [b.op("Shape", [a]), b.const(np.array(0, np.int64))], axis=0),
                                   b.const(np.array([0], np.int64))])
        minus = b.op("Unsqueeze", [b.const(np.array(-1, np.int64)), b.const(np.array([0], np.int64))])
        flat = b.op("Reshape", [a, b.op("Concat", [batch, minus], axis=0)])
    y = b.gemm(flat, 96, 7, trans_b=trans_b)
    model = b.model({"x": [2, 3, 4, 4]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 2
    gemm = [s for n, s in weight_shapes(result.model).items() if "Gemm" in n][0]
    assert gemm == ([7, 64] if trans_b else [64, 7])
    assert_same(model, result.model, [2, 3, 4, 4])


@pytest.mark.parametrize("op", ["Gemm", "MatMul"])
def test_dense_layers_with_batchnorm1d(op):
    b = Builder()
    if op == "Gemm":
        h = b.gemm("x", 10, 12)
    else:
        h = b.op("MatMul", ["x", b.const(b.rng.standard_normal((10, 12)).astype(np.float32))])
    h = b.op("Sigmoid", [b.bn(h, 12, DEAD, None)])
    y = b.op("MatMul", [h, b.const(b.rng.standard_normal((12, 4)).astype(np.float32))]) if op == "MatMul" else b.gemm(h, 12, 4)
    model = b.model({"x": [3, 10]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 3
    assert result.report.surgery.compensated_layers == 1
    assert_same(model, result.model, [3, 10])


@pytest.mark.parametrize("op,attrs,opset", [
    ("MaxPool", {"kernel_shape": [2, 2], "strides": [2, 2]}, 17),
    ("AveragePool", {"kernel_shape": [3, 3], "pads": [1, 1, 1, 1]}, 17),
    ("GlobalAveragePool", {}, 17), ("GlobalMaxPool", {}, 17),
    ("ReduceMean", {"axes": [2, 3], "keepdims": 1}, 13), ("ReduceMax", {"axes": [-1, -2], "keepdims": 1}, 13),
    ("ReduceMean", {"keepdims": 1}, 18),
])
def test_pooling(op, attrs, opset):
    b = Builder(opset=opset)
    a = b.op("Relu", [stem(b, beta_dead=0.0)])
    if op == "ReduceMean" and opset >= 18:
        pooled = b.op(op, [a, b.const(np.array([2, 3], np.int64))], **attrs)
    else:
        pooled = b.op(op, [a], **attrs)
    y = b.conv(pooled, 8, 4, k=1)
    prunes_exactly(b, y, [1, 3, 6, 6], removed=3)


@pytest.mark.parametrize("opset", [7, 11, 18])
def test_pad_off_the_channel_axis(opset):
    b = Builder(opset=opset)
    pads = [0, 0, 1, 2, 0, 0, 1, 2]
    if opset < 11:
        a = b.op("Pad", [b.op("Relu", [b.conv("x", 3, 8)])], pads=pads)
        a = b.bn(a, 8, DEAD, 0.0)
    else:
        a = b.op("Pad", [b.op("Relu", [stem(b, beta_dead=0.0)]), b.const(np.array(pads, np.int64))], mode="reflect")
    y = b.conv(a, 8, 4, k=1)
    prunes_exactly(b, y, [1, 3, 6, 6], removed=3)


@pytest.mark.parametrize("form", ["Resize-scales", "Resize-sizes", "Upsample"])
def test_resize(form):
    b = Builder(opset=9 if form == "Upsample" else 13)
    a = b.op("Relu", [stem(b)])
    if form == "Upsample":
        up = b.op("Upsample", [a, b.const(np.array([1, 1, 2, 2], np.float32))])
    elif form == "Resize-scales":
        up = b.op("Resize", [a, "", b.const(np.array([1, 1, 2, 2], np.float32))], mode="nearest")
    else:
        up = b.op("Resize", [a, "", "", b.const(np.array([1, 8, 10, 10], np.int64))], mode="linear")
    y = b.conv(up, 8, 4, k=1)
    prunes_exactly(b, y, [1, 3, 5, 5], removed=3)


def test_squeeze_unsqueeze_round_trip_as_tf2onnx_writes_se():
    b = Builder(opset=13)
    a = b.op("Relu", [stem(b, beta_dead=0.0)])
    s = b.op("Squeeze", [b.op("GlobalAveragePool", [a]), b.const(np.array([2, 3], np.int64))])
    u = b.op("Unsqueeze", [b.op("Relu", [s]), b.const(np.array([2, 3], np.int64))])
    y = b.conv(b.op("Mul", [a, u]), 8, 4, k=1)
    prunes_exactly(b, y, [1, 3, 5, 5], removed=3)


def blocked(model) -> list[str]:
    return [s.blocked for s in inspect(model).spaces if s.blocked]


def test_graph_output_blocks():
    b = Builder()
    model = b.model({"x": [1, 3, 5, 5]}, [stem(b)])
    assert any("graph output" in r for r in blocked(model))
    with pytest.raises(BnSlimError, match="blocked"):
        prune(model, ratio=0.5)


@pytest.mark.parametrize("case,reason", [
    ("transpose", "Transpose"), ("grouped", "grouped convolution over channels of several layers"),
    ("channel-pad", "pads the channel axis"),
    ("reshape", "changes the channel axis"), ("concat-h", "axis other than the channels"),
])
def test_unknown_or_channel_mixing_ops_block_with_a_reason(case, reason):
    b = Builder()
    a = b.op("Relu", [stem(b)])
    if case == "transpose":
        a = b.op("Transpose", [a], perm=[0, 1, 3, 2])
    elif case == "grouped":
        a = b.conv(b.op("Concat", [a, b.op("Relu", [stem(b)])], axis=1), 16, 8, group=2)
    elif case == "channel-pad":
        a = b.op("Pad", [a, b.const(np.array([0, 1, 0, 0, 0, 1, 0, 0], np.int64))])
    elif case == "reshape":
        a = b.op("Reshape", [a, b.const(np.array([1, 4, 2, 25], np.int64))])
    else:
        a = b.op("Concat", [a, a], axis=2)
    y = b.op("ReduceSum", [a], keepdims=0)
    model = b.model({"x": [1, 3, 5, 5]}, [y])
    reasons = blocked(model)
    assert any(reason in r for r in reasons), reasons


def test_registry_rejects_a_second_rule_for_an_op():
    with pytest.raises(ValueError, match="two rules claim op Relu"):
        @register
        class Again(Rule):
            ops = ("Relu",)
    assert type(RULES["Relu"]).__name__ == "UnaryRule"


@pytest.mark.parametrize("stride,beta_dead", [(1, None), (2, 0.0)])
def test_conv_transpose_opens_and_consumes_spaces(stride, beta_dead):
    # UNet decoder: ConvTranspose upsampling, its BN, a concat with the skip connection
    b = Builder()
    skip = b.op("Relu", [stem(b, beta_dead=beta_dead)])
    down = b.op("MaxPool", [skip], kernel_shape=[stride, stride], strides=[stride, stride])
    w = b.const(b.rng.standard_normal((8, 6, stride, stride)).astype(np.float32) * 0.3)
    up = b.op("ConvTranspose", [down, w], kernel_shape=[stride, stride], strides=[stride, stride])
    up = b.op("Relu", [b.bn(up, 6, np.array([0, 4]), beta_dead)])
    y = b.conv(b.op("Concat", [skip, up], axis=1), 14, 3, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 5
    convt = next(n for n in result.model.graph.node if n.op_type == "ConvTranspose")
    assert weight_shapes(result.model).get(convt.name) == [5, 4, stride, stride]
    if stride == 1:
        assert_same(model, result.model, [1, 3, 6, 6])
    else:  # a strided ConvTranspose spreads a removed constant unevenly: exact only with beta = 0
        assert result.report.surgery.compensated_layers == 0 or result.report.surgery.approximate_layers
        assert_same(model, result.model, [1, 3, 6, 6])


@pytest.mark.parametrize("opset", [11, 13, 18])
@pytest.mark.parametrize("explicit", [True, False])
def test_split_on_channels_as_csp_blocks_do(opset, explicit):
    # YOLO C2f: conv -> split in two -> one half through a bottleneck -> concat of all
    b = Builder(opset=opset)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, np.array([1, 2, 5, 6]), None)])
    if opset < 13:
        halves = b.op("Split", [a], n_out=2, axis=1, **({"split": [4, 4]} if explicit else {}))
    elif opset < 18 or explicit:
        halves = b.op("Split", [a] + ([b.const(np.array([4, 4], np.int64))] if explicit else []), n_out=2, axis=1)
    else:
        halves = b.op("Split", [a], n_out=2, axis=1, num_outputs=2)
    body = b.op("Relu", [b.bn(b.conv(halves[1], 4, 4), 4, np.array([3]), None)])
    y = b.conv(b.op("Concat", [halves[0], halves[1], body], axis=1), 12, 3, k=1)
    prunes_exactly(b, y, [1, 3, 6, 6], removed=5)


def test_split_parts_each_keep_a_channel():
    b = Builder(opset=13)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 6), 6, np.array([0, 1, 2]), None)])  # the whole first part is dead
    first, second = b.op("Split", [a, b.const(np.array([3, 3], np.int64))], n_out=2, axis=1)
    y = b.op("Add", [b.conv(first, 3, 2, k=1), b.conv(second, 3, 2, k=1)])
    model = b.model({"x": [1, 3, 5, 5]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 2  # one channel of the dead part stays
    assert_same(model, result.model, [1, 3, 5, 5])


@pytest.mark.parametrize("opset", [9, 13])
def test_slice_of_channels_and_of_space(opset):
    b = Builder(opset=opset)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, np.array([0, 3, 6]), None)])
    if opset < 10:
        part = b.op("Slice", [a], starts=[2, 1], ends=[7, 100], axes=[1, 2])
    else:  # axes out of order: the bounds follow the axes' order, not the tensor's
        part = b.op("Slice", [a, *(b.const(np.array(v, np.int64)) for v in ([1, 2], [100, 7], [-2, 1], [1, 1]))])
    y = b.conv(part, 5, 3, k=1)
    model = b.model({"x": [1, 3, 5, 5]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 3  # 3 and 6 inside [2, 7), and 0, which the slice drops anyway
    assert_same(model, result.model, [1, 3, 5, 5])


@pytest.mark.parametrize("mode", [{"threshold": 1e-6}, {"ratio": 0.5}])
def test_regression_fuzz_slice_then_flatten_keeps_the_part_offset(mode):
    # found by test_fuzz: Flatten rebuilt the layout without the Slice's offset, so the Gemm
    # after it was cut for the wrong channels (onnxruntime: "GEMM: Dimension mismatch")
    b = Builder(opset=11)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 6), 6, np.array([4]), 0.0)])
    part = b.op("Slice", [a, *(b.const(np.array(v, np.int64)) for v in ([1], [5], [1]))])
    y = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [part])], axis=1), 4, 4)
    model = b.model({"x": [2, 3, 4, 4]}, [y])
    result = slim(model, **mode) if "threshold" in mode else prune(model, **mode)
    assert result.report.removed_channels >= 1
    if "threshold" in mode:
        assert_same(model, result.model, [2, 3, 4, 4])


@pytest.mark.parametrize("beta_dead", [0.0, None])
def test_grouped_conv_removes_equal_numbers_per_group(beta_dead):
    # ResNeXt: 1x1 conv -> BN -> grouped 3x3 (4 groups of 3) -> BN -> 1x1
    b = Builder()
    a = b.op("Relu", [b.bn(b.conv("x", 3, 12, k=1), 12, np.array([0, 1, 4, 7, 10]), beta_dead)])  # 2, 1, 1, 1 per group
    g = b.op("Relu", [b.bn(b.conv(a, 12, 8, group=4, pad=0, k=1), 8, np.array([0, 3, 5, 6]), beta_dead)])  # 1 per group
    y = b.conv(g, 8, 3, k=1)
    model = b.model({"x": [1, 3, 5, 5]}, [y])
    result = slim(model)
    shapes = weight_shapes(result.model)
    grouped = next(n for n in result.model.graph.node if any(a.name == "group" and a.i == 4 for a in n.attribute))
    assert shapes[grouped.name] == [4, 2, 1, 1]  # 4 groups x (3 - 1) inputs, 4 groups x (2 - 1) outputs
    assert result.report.removed_channels == 4 + 4
    assert_same(model, result.model, [1, 3, 5, 5])


def test_subgraphs_and_other_domains_block():
    from onnx import TensorProto, helper

    b = Builder(opset=17)
    a = b.op("Relu", [stem(b)])
    then = helper.make_graph([helper.make_node("Identity", [a], ["t_out"])], "then", [],
                             [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
    other = helper.make_graph([helper.make_node("Neg", [a], ["e_out"])], "else", [],
                              [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
    cond = b.const(np.array(True))
    branch = b.op("If", [cond], then_branch=then, else_branch=other)
    y = b.op("ReduceSum", [branch], keepdims=0)
    model = b.model({"x": [1, 3, 5, 5]}, [y])
    assert any("inside its subgraph" in r for r in blocked(model))
    b = Builder(opset=17)
    a = b.op("Relu", [stem(b)])
    b.nodes.append(helper.make_node("Conv", [a, b.const(np.ones((2, 8, 1, 1), np.float32))], ["custom"], domain="com.example",
                                    name="custom_conv"))
    graph = helper.make_graph(b.nodes, "t", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 5, 5])],
                              [helper.make_tensor_value_info("custom", TensorProto.FLOAT, None)], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)])
    reasons = [s.blocked for s in inspect(model, options=None).spaces if s.blocked]
    assert any("Conv custom_conv is not an op onnx-bnslim can follow" in r for r in reasons), reasons


def test_exact_borders_adds_the_border_correction():
    b = Builder()
    y = b.conv(b.op("Relu", [stem(b, beta_dead=None)]), 8, 4, k=3)
    model = b.model({"x": [1, 3, 8, 8]}, [y])
    result = slim(model, exact_borders=True)
    assert result.report.surgery.approximate_layers == 0
    assert sum(n.op_type == "Add" for n in result.model.graph.node) == 1
    assert_same(model, result.model, [1, 3, 8, 8])  # borders included
    b = Builder()  # a dynamic image size: the map would not fit every size, so it is not added
    y = b.conv(b.op("Relu", [stem(b, beta_dead=None)]), 8, 4, k=3)
    model = b.model({"x": [1, 3, "H", "W"]}, [y], {y: [1, 4, "H", "W"]})
    result = slim(model, exact_borders=True, input_shapes={"x": [1, 3, 8, 8]})
    assert result.report.surgery.approximate_layers == 1
    assert not any(n.op_type == "Add" for n in result.model.graph.node)


def test_split_to_sequence_as_the_dynamo_exporter_writes_torch_split():
    # dynamo, optimize=False: torch.split -> SplitToSequence + SequenceAt
    b = Builder(opset=18)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, np.array([1, 2, 5, 6]), None)])
    seq = b.op("SplitToSequence", [a, b.const(np.array([4, 4], np.int64))], axis=1)
    first = b.op("SequenceAt", [seq, b.const(np.array(0, np.int64))])
    second = b.op("SequenceAt", [seq, b.const(np.array(1, np.int64))])
    body = b.op("Relu", [b.bn(b.conv(second, 4, 4), 4, np.array([3]), None)])
    y = b.conv(b.op("Concat", [first, second, body], axis=1), 12, 3, k=1)
    model = b.model({"x": [1, 3, 6, 6]}, [y])
    result = slim(model)
    assert result.report.removed_channels == 5
    assert not any(n.op_type == "SplitToSequence" for n in result.model.graph.node)
    assert_same(model, result.model, [1, 3, 6, 6])


@pytest.mark.parametrize("mode", [{"threshold": 1e-6}, {"ratio": 0.5}])
def test_regression_fuzz_reader_bn_on_a_grouped_space_keeps_the_groups_even(mode):
    # found by test_fuzz: a grouped conv's output (2 groups) also went into a Concat read by a
    # BN and a raw conv; the branch's channels put back into the grouped space left the groups
    # uneven (onnxruntime: "Output channels M is not divisible by group")
    b = Builder(opset=9)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 2), 2)])
    g = b.op("Relu", [b.bn(b.conv(a, 2, 8, k=1, pad=0, group=2), 8, np.array([0, 1, 2, 5]), None)])
    cat = b.op("Concat", [g, b.conv(g, 8, 2)], axis=1)  # a part no BN scales: the raw conv reads it unknown
    left = b.conv(b.op("Relu", [b.bn(cat, 10, np.array([1, 6]), None)]), 10, 8, k=1, pad=0)
    y = b.op("Add", [left, b.conv(cat, 10, 8, k=1, pad=0)])
    model = b.model({"x": [2, 3, 4, 4]}, [y])
    result = prune(model, min_channels=1, round_to=1, exact_borders=True, **mode)
    if "threshold" in mode:
        assert result.report.removed_channels >= 1
        assert_same(model, result.model, [2, 3, 4, 4])
    grouped = next(n for n in result.model.graph.node if any(a.name == "group" and a.i == 2 for a in n.attribute))
    out_channels = weight_shapes(result.model)[grouped.name][0]
    assert out_channels % 2 == 0

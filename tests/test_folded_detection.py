"""Which layers without a BatchNormalization node had one folded in (issue 8, point 3).

Mixed-form graphs as exporters write them: Paddle (a few BN kept in a head, the rest folded with a
bias input or with the bias as a separate per-channel Add), VGG16-BN and MobileNetV3 exported with
BN kept (classifier Linear layers and squeeze-excitation convs never had a BN), and all-folded
models where only the calibration statistics can tell a classifier Linear from a folded one."""

from __future__ import annotations

import numpy as np
import onnx
from onnx import numpy_helper

from onnxslim_bn import inspect, prune
from onnxslim_bn.passes.importance import NEVER_BN
from tests.graphs import Builder, random_input, run, weight_shapes

SHAPE = [8, 3, 8, 8]  # 8 random samples in every comparison
RTOL, FLOOR = 1e-5, 1e-6  # |pruned - original| <= RTOL * max |original| + FLOOR


def folded_conv(b: Builder, x: str, cin: int, cout: int, dead: list[int], k: int = 3, bias_as_add: bool = False) -> str:
    """A Conv with a BN folded in: dead channels (gamma 0) have zero weights and output their
    bias (beta; -4 here, so that the ReLU or HardSwish after them makes them exactly 0). With
    ``bias_as_add`` the bias is a separate per-channel Add after a bias-less Conv (newer paddle2onnx)."""
    w = (b.rng.standard_normal((cout, cin, k, k)) * 0.3).astype(np.float32)
    bias = (b.rng.standard_normal(cout) * 0.2).astype(np.float32)
    w[dead] = 0.0
    bias[dead] = -4.0
    if bias_as_add:
        y = b.op("Conv", [x, b.const(w)], kernel_shape=[k, k], pads=[k // 2] * 4)
        return b.op("Add", [y, b.const(bias.reshape(1, cout, 1, 1))])
    return b.op("Conv", [x, b.const(w), b.const(bias)], kernel_shape=[k, k], pads=[k // 2] * 4)


def node_of(b: Builder, op: str, nth: int = 0) -> str:
    return [n.name for n in b.nodes if n.op_type == op][nth]


def space_of(spaces, producer: str):
    hits = [s for s in spaces if producer in s.producers]
    assert len(hits) == 1, [s.producers for s in spaces]
    return hits[0]


def assert_exact(model: onnx.ModelProto, pruned: onnx.ModelProto) -> None:
    x = random_input(SHAPE, 3)
    for a, b in zip(run(model, {"x": x}), run(pruned, {"x": x})):
        assert a.shape == b.shape
        assert np.abs(b - a).max() <= RTOL * np.abs(a).max() + FLOOR


def se(b: Builder, a: str, c: int) -> str:
    """Squeeze-excitation with biased convs that never had a BN: a * HardSigmoid(conv(relu(conv(pool(a)))))."""
    s = b.op("Relu", [b.conv(b.op("GlobalAveragePool", [a]), c, c // 2, k=1, pad=0, bias=True)])
    return b.op("Mul", [a, b.op("HardSigmoid", [b.conv(s, c // 2, c, k=1, pad=0, bias=True)])])


def paddle_model() -> tuple[onnx.ModelProto, Builder]:
    """Backbone folded (bias input; one conv with its bias as an Add), an SE block, a head with
    BN kept, and a final biased conv into Sigmoid (a prediction map, never had BN)."""
    b = Builder(seed=3)
    a = b.op("Relu", [folded_conv(b, "x", 3, 8, [1, 5])])
    a = b.op("HardSwish", [folded_conv(b, a, 8, 8, [0, 2, 7], bias_as_add=True)])
    a = se(b, a, 8)
    a = b.op("Relu", [b.bn(b.conv(a, 8, 8), 8, np.array([3]), 0.0)])  # the one BN the exporter kept
    y = b.op("Sigmoid", [b.conv(a, 8, 2, k=1, pad=0, bias=True)])
    return b.model({"x": SHAPE}, [y]), b


def test_paddle_one_kept_bn_does_not_make_folded_convs_never_bn():
    model, b = paddle_model()
    spaces = inspect(model).spaces
    first, with_add = node_of(b, "Conv", 0), node_of(b, "Conv", 1)
    assert space_of(spaces, first).source == "folded"
    assert space_of(spaces, with_add).source == "folded"
    assert space_of(spaces, with_add).blocked is None


def test_bias_as_separate_add_is_the_folded_scale_node():
    model, b = paddle_model()
    with_add = node_of(b, "Conv", 1)
    bias_add = next(n.name for n in b.nodes if n.op_type == "Add")
    space = space_of(inspect(model).spaces, with_add)
    assert space.score_nodes == [bias_add]
    assert [i for i, v in enumerate(space.scores) if v < 1e-6] == [0, 2, 7]


def test_paddle_se_conv_with_bias_never_had_bn():
    model, b = paddle_model()
    reduce_conv = node_of(b, "Conv", 2)
    space = space_of(inspect(model).spaces, reduce_conv)
    assert space.blocked is not None and NEVER_BN in space.blocked
    assert "no spatial extent" in space.blocked


def test_paddle_mixed_model_prunes_dead_folded_channels_exactly():
    model, b = paddle_model()
    result = prune(model, threshold=1e-6, min_channels=1, round_to=1)
    shapes = weight_shapes(result.model)
    assert shapes[node_of(b, "Conv", 0)][0] == 6
    assert shapes[node_of(b, "Conv", 1)][0] == 5  # the Add-bias conv lost its 3 dead channels
    assert shapes[node_of(b, "Conv", 2)][0] == 4  # the SE reduce conv is left alone
    assert_exact(model, result.model)


def vgg_kept_model(dense: str = "Gemm") -> tuple[onnx.ModelProto, list[str]]:
    """VGG16-BN exported with BN kept: conv-BN-ReLU, then Linear-ReLU-Linear-ReLU-Linear.
    ``dense="MatMul"`` writes each Linear as MatMul then a bias Add (tf2onnx's Dense)."""
    b = Builder(seed=4)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 16), 16)])
    a = b.op("Relu", [b.bn(b.conv(a, 16, 16), 16)])
    h = b.op("Flatten", [b.op("MaxPool", [a], kernel_shape=[4, 4], strides=[4, 4])], axis=1)  # 16 * 2 * 2
    names, width = [], 64
    for out in (32, 32, 10):
        if dense == "Gemm":
            h = b.gemm(h, width, out)
        else:
            h = b.op("MatMul", [h, b.const((b.rng.standard_normal((width, out)) * 0.2).astype(np.float32))])
            h = b.op("Add", [h, b.const((b.rng.standard_normal(out) * 0.1).astype(np.float32))])
        names.append(next(n.name for n in reversed(b.nodes) if n.op_type == dense))
        h = b.op("Relu", [h]) if out != 10 else h
        width = out
    return b.model({"x": SHAPE}, [h]), names[:2]


def test_vgg_bn_kept_classifier_never_had_bn():
    for dense in ("Gemm", "MatMul"):
        model, linears = vgg_kept_model(dense)
        spaces = inspect(model).spaces
        for name in linears:
            space = space_of(spaces, name)
            assert space.blocked is not None and NEVER_BN in space.blocked, (dense, name, space.blocked, space.source)
        result = prune(model, ratio=0.5, min_channels=1, round_to=1)
        assert all(weight_shapes(result.model)[n][-1 if dense == "MatMul" else 0] == 32 for n in linears)
        assert result.report.removed_channels == 16  # the ratio is spent on the 32 conv channels


def test_mobilenetv3_bn_kept_classifier_and_se_never_had_bn():
    b = Builder(seed=5)
    a = b.op("HardSwish", [b.bn(b.conv("x", 3, 16), 16)])
    a = b.op("Relu", [b.bn(b.conv(a, 16, 16, k=3, group=16), 16)])  # depthwise
    a = se(b, a, 16)
    a = b.op("HardSwish", [b.bn(b.conv(a, 16, 24, k=1, pad=0), 24)])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [a])], axis=1)
    h = b.op("HardSwish", [b.gemm(h, 24, 40)])  # the 1280-wide Linear of MobileNetV3
    wide = node_of(b, "Gemm")
    y = b.gemm(h, 40, 10)
    model = b.model({"x": SHAPE}, [y])
    spaces = inspect(model).spaces
    assert NEVER_BN in (space_of(spaces, wide).blocked or "")
    assert NEVER_BN in (space_of(spaces, node_of(b, "Conv", 2)).blocked or "")  # the SE reduce conv
    result = prune(model, ratio=0.5, min_channels=1, round_to=1)
    assert weight_shapes(result.model)[wide][0] == 40


def test_bias_add_must_broadcast_over_channels():
    # a [W]-shaped constant with W == C is added along W: it is not a per-channel bias
    b = Builder(seed=6)
    a = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8)])
    y = b.op("Conv", [a, b.const((b.rng.standard_normal((8, 8, 3, 3)) * 0.3).astype(np.float32))],
             kernel_shape=[3, 3], pads=[1] * 4)
    conv = b.nodes[-1].name
    y = b.op("Relu", [b.op("Add", [y, b.const(b.rng.standard_normal(8).astype(np.float32))])])
    model = b.model({"x": SHAPE}, [b.conv(y, 8, 4, k=1, pad=0)])
    space = space_of(inspect(model).spaces, conv)
    assert space.source == "" and space.score_nodes == []


def test_resnet_join_then_relu_counts_as_activated_in_a_mixed_model():
    # conv(bias) -> Add(shortcut) -> Relu is how a folded conv-bn ends a ResNet block; one BN kept elsewhere
    b = Builder(seed=7)
    stem = b.op("Relu", [folded_conv(b, "x", 3, 8, [2])])
    branch = b.op("Relu", [folded_conv(b, stem, 8, 8, [])])
    last = folded_conv(b, branch, 8, 8, [])
    out = b.op("Relu", [b.op("Add", [last, stem])])
    head = b.op("Relu", [b.bn(b.conv(out, 8, 8, k=1, pad=0), 8)])
    model = b.model({"x": SHAPE}, [b.conv(head, 8, 3, k=1, pad=0)])
    space = space_of(inspect(model).spaces, node_of(b, "Conv", 2))
    assert space.blocked is None and space.source == "folded"
    assert node_of(b, "Conv", 0) in space.producers  # stem, branch end and shortcut are one space


def test_linear_bottleneck_without_activation_is_left_alone_in_a_mixed_model():
    # documented limit: a folded conv-bn with no activation after it (MobileNetV2's projection)
    # cannot be told from a layer that never had BN once the exporter kept BN elsewhere
    b = Builder(seed=8)
    a = b.op("Relu", [folded_conv(b, "x", 3, 8, [1])])
    proj = folded_conv(b, a, 8, 8, [3], k=1)
    head = b.op("Relu", [b.bn(b.conv(proj, 8, 8, k=1, pad=0), 8)])
    model = b.model({"x": SHAPE}, [b.conv(head, 8, 3, k=1, pad=0)])
    spaces = inspect(model).spaces
    assert space_of(spaces, node_of(b, "Conv", 0)).source == "folded"
    assert NEVER_BN in (space_of(spaces, node_of(b, "Conv", 1)).blocked or "")


def all_folded_model(classifier_scale: float) -> tuple[onnx.ModelProto, str, str]:
    """Every BN folded: folded convs, a folded Linear + BN1d (dead rows, on the convs' scale), and
    a Linear that never had BN whose outputs vary ``classifier_scale`` times as much."""
    b = Builder(seed=9)
    a = b.op("Relu", [folded_conv(b, "x", 3, 16, [0, 4])])
    a = b.op("Relu", [folded_conv(b, a, 16, 16, [3, 9, 12])])
    h = b.op("Flatten", [b.op("GlobalAveragePool", [a])], axis=1)
    h = b.op("Relu", [b.gemm(h, 16, 24)])
    folded_linear = node_of(b, "Gemm")
    gemm_w = next(t for t in b.inits if t.name == b.nodes[-2].input[1])
    w = numpy_helper.to_array(gemm_w).copy() * 4.0
    w[[1, 7]] = 0.0  # gamma 0 folded in
    gemm_w.CopyFrom(numpy_helper.from_array(w, gemm_w.name))
    h = b.op("Relu", [b.gemm(h, 24, 24)])
    plain = node_of(b, "Gemm", 1)
    plain_w = next(t for t in b.inits if t.name == b.nodes[-2].input[1])
    plain_w.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(plain_w) * classifier_scale, plain_w.name))
    y = b.gemm(h, 24, 10)
    return b.model({"x": SHAPE}, [y]), folded_linear, plain


def test_all_folded_model_dense_layers_are_judged_by_their_statistics():
    model, folded_linear, plain = all_folded_model(classifier_scale=0.01)
    spaces = inspect(model).spaces
    assert space_of(spaces, folded_linear).source == "folded"
    assert space_of(spaces, plain).blocked is not None
    assert "never had one" in space_of(spaces, plain).blocked
    result = prune(model, threshold=1e-6, min_channels=1, round_to=1)
    shapes = weight_shapes(result.model)
    assert shapes[folded_linear][0] == 22 and shapes[plain][0] == 24
    assert_exact(model, result.model)


def test_all_folded_model_dense_layer_on_scale_is_scored():
    model, folded_linear, plain = all_folded_model(classifier_scale=4.0)
    spaces = inspect(model).spaces
    assert space_of(spaces, folded_linear).source == "folded"
    assert space_of(spaces, plain).source == "folded"

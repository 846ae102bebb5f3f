"""Graph shapes that TF (tf2onnx) and PaddlePaddle (paddle2onnx) write, built with onnx.helper:
NHWC Transposes at the ends, BN as Mul + Add, Relu6 as Clip with constant inputs, hard-swish
spelled x * Clip(x + 3, 0, 6) / 6, squeeze-excitation as GlobalAveragePool -> Squeeze ->
Reshape -> Conv, a Shape -> Gather -> Concat -> Reshape head with a dynamic batch, and
Constant nodes instead of initializers."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper

from onnxslim_bn import inspect, prune
from tests.graphs import Builder, random_input, run


def split_bn(b: Builder, x: str, c: int, dead: np.ndarray) -> str:
    s = b.rng.uniform(0.5, 1.5, c).astype(np.float32)
    t = (b.rng.standard_normal(c) * 0.3).astype(np.float32)
    s[dead], t[dead] = 0.0, 0.0
    return b.op("Add", [b.op("Mul", [x, b.const(s.reshape(c, 1, 1))]), b.const(t.reshape(c, 1, 1))])


def hard_swish(b: Builder, x: str) -> str:
    clipped = b.op("Clip", [b.op("Add", [x, b.const(np.float32(3.0))]), b.const(np.float32(0.0)), b.const(np.float32(6.0))])
    return b.op("Div", [b.op("Mul", [x, clipped]), b.const(np.float32(6.0))])


def relu6(b: Builder, x: str) -> str:
    return b.op("Clip", [x, b.const(np.float32(0.0)), b.const(np.float32(6.0))])


def tf_style(opset: int) -> onnx.ModelProto:
    b = Builder(seed=3, opset=opset)
    x = b.op("Transpose", ["x"], perm=[0, 3, 1, 2])  # NHWC input
    a = hard_swish(b, split_bn(b, b.conv(x, 3, 8, bias=True), 8, np.array([1, 5])))
    d = relu6(b, split_bn(b, b.conv(a, 8, 8, group=8, bias=True), 8, np.array([1, 5, 6])))
    squeezed = b.op("Squeeze", [b.op("GlobalAveragePool", [d]), b.const(np.array([2, 3], np.int64))]) if opset >= 13 \
        else b.op("Squeeze", [b.op("GlobalAveragePool", [d])], axes=[2, 3])
    reshaped = b.op("Reshape", [squeezed, b.const(np.array([-1, 8, 1, 1], np.int64))])
    gate = b.op("HardSigmoid", [b.conv(b.op("Relu", [b.conv(reshaped, 8, 4, k=1, bias=True)]), 4, 8, k=1, bias=True)])
    e = b.op("Mul", [d, gate])
    p = split_bn(b, b.conv(e, 8, 6, k=1, bias=True), 6, np.array([2]))
    batch = b.op("Gather", [b.op("Shape", [p]), b.const(np.array([0], np.int64))], axis=0)
    target = b.op("Concat", [batch, b.const(np.array([-1], np.int64))], axis=0)
    head = b.gemm(b.op("Reshape", [p, target]), 6 * 5 * 5, 3)
    model = b.model({"x": ["N", 5, 5, 3]}, [head], {head: ["N", 3]})
    return _constants_as_nodes(model)


def _constants_as_nodes(model: onnx.ModelProto) -> onnx.ModelProto:
    """tf2onnx writes small constants as Constant nodes."""
    small = [t for t in model.graph.initializer if np.prod(t.dims) <= 8]
    nodes = [helper.make_node("Constant", [], [t.name], value=t) for t in small]
    for t in small:
        model.graph.initializer.remove(t)
    rest = list(model.graph.node)
    del model.graph.node[:]
    model.graph.node.extend(nodes + rest)
    onnx.checker.check_model(model, full_check=True)
    return model


@pytest.mark.parametrize("opset", [11, 13, 15, 17])
def test_tf2onnx_style_graph_prunes_exactly(opset):
    model = tf_style(opset)
    spaces = [s for s in inspect(model, options=None).spaces]
    assert {s.source for s in spaces if s.blocked is None} == {"mul"}
    result = prune(model, threshold=1e-6, min_channels=1, round_to=1, input_shapes={"x": [2, 5, 5, 3]})
    assert result.report.removed_channels == 2 + 1  # 1 and 5 (dead in both split BNs; 6 is alive in the first) and 2
    xin = random_input([4, 5, 5, 3])
    np.testing.assert_allclose(run(result.model, {"x": xin})[0], run(model, {"x": xin})[0], atol=1e-5, rtol=1e-5)
    dims = result.model.graph.input[0].type.tensor_type.shape.dim
    assert dims[0].dim_param == "N"  # the dynamic batch survives

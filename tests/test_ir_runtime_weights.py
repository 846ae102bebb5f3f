"""The weight-axis table against onnxruntime, and the session factory and chunked runner."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_bn.errors import BnSlimError
from onnxslim_bn.ir import runtime
from onnxslim_bn.ir.weights import LAYER_OPS, axes, axes_of

# (op, attributes, input shape without the batch, kernel): every row of the table, grouped and not
LAYERS = [
    ("Conv", {"group": 1, "kernel_shape": [3, 3]}, [6, 5, 5], [3, 3]),
    ("Conv", {"group": 2, "kernel_shape": [1, 1]}, [6, 5, 5], [1, 1]),
    ("Conv", {"group": 6, "kernel_shape": [3]}, [6, 7], [3]),
    ("ConvTranspose", {"group": 1, "kernel_shape": [2, 2], "strides": [2, 2]}, [6, 4, 4], [2, 2]),
    ("ConvTranspose", {"group": 3, "kernel_shape": [3, 3]}, [6, 4, 4], [3, 3]),
    ("Gemm", {"transB": 0}, [6], []),
    ("Gemm", {"transB": 1, "alpha": 0.5, "beta": 2.0}, [6], []),
    ("MatMul", {}, [6], []),
]


@pytest.mark.parametrize("op, attrs, x_shape, kernel", LAYERS, ids=lambda v: str(v))
def test_the_weight_a_row_describes_runs_with_those_channels(op, attrs, x_shape, kernel):
    """The weight shaped by the table for c_in -> c_out runs in onnxruntime on c_in input
    channels and gives c_out output channels; the table reads the same channels back."""
    c_in, c_out = x_shape[0], 12
    found = axes_of(op, attrs)
    shape = found.shape(c_in, c_out, kernel)
    assert (found.in_channels(shape), found.out_channels(shape)) == (c_in, c_out)
    weight = numpy_helper.from_array(np.ones(shape, np.float32), "w")
    inputs = ["x", "w"]
    inits = [weight]
    if found.bias is not None:
        inits.append(numpy_helper.from_array(np.ones(c_out, np.float32), "b"))
        inputs.append("b")
    node = helper.make_node(op, inputs, ["y"], **attrs)
    model = helper.make_model(helper.make_graph(
        [node], "layer", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, *x_shape])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], inits),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)
    assert axes(model.graph.node[0]) == found  # an onnx.NodeProto reads the same row
    (y,) = runtime.run(runtime.session(model, op), {"x": np.ones([2, *x_shape], np.float32)}, None)
    assert y.shape[-1 if not found.spatial else 1] == c_out
    assert found.scatters == (op == "ConvTranspose") and found.spatial == (op in ("Conv", "ConvTranspose"))
    assert (found.scale, found.bias_scale) == (attrs.get("alpha", 1.0), attrs.get("beta", 1.0))


def test_ops_without_a_weight_have_no_row():
    assert axes_of("Relu", {}) is None and LAYER_OPS == {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def _chain() -> onnx.ModelProto:
    nodes = [helper.make_node("Relu", ["x"], ["r"]), helper.make_node("Neg", ["r"], ["y"])]
    return helper.make_model(helper.make_graph(
        nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 3])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [4, 3])]),
        opset_imports=[helper.make_opsetid("", 17)], ir_version=8)


def test_extra_outputs_leave_the_model_as_it_was_and_fixed_batches_pad_or_drop():
    model = _chain()
    before = model.SerializeToString()
    sess = runtime.session(model, "chain", extra_outputs=["r", "r"])
    assert model.SerializeToString() == before
    x = np.linspace(-1, 1, 10 * 3, dtype=np.float32).reshape(10, 3)
    r, y = runtime.run(sess, {"x": x}, 4, ["r", "y"])  # 10 samples in batches of 4: the last padded
    np.testing.assert_array_equal(r, np.maximum(x, 0))
    np.testing.assert_array_equal(y, -np.maximum(x, 0))
    streamed = list(runtime.stream(sess, {"x": x}, ["r"], 4))  # reducers: whole batches only
    assert [list(s) for s, _ in streamed] == [[0, 1, 2, 3], [4, 5, 6, 7]]
    np.testing.assert_array_equal(np.concatenate([v[0] for _, v in streamed]), np.maximum(x[:8], 0))


def test_a_model_onnxruntime_refuses_is_one_line_naming_it():
    model = _chain()
    model.graph.node[0].op_type = "NoSuchOp"
    with pytest.raises(BnSlimError, match="^a chain: onnxruntime cannot load it"):
        runtime.session(model, "a chain")

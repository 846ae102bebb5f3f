"""QDQ input models (onnxslim_bn.ir.quantized): an already-quantized model prunes as its integers.

The fixtures are small CNNs (Conv-BN-ReLU stacks, a residual Add, a Gemm head) with dead
channels (gamma 0, beta 0: exactly zero before quantization), quantized by onnxruntime's own
``quant_pre_process`` + ``quantize_static(..., quant_format=QDQ)``, per channel and per tensor.
Pruned, the kept channels' integers, scales and zero points are the original's entries, and
onnxruntime gives the original's outputs to 1e-5.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import onnxslim_bn
from onnxslim_bn.app.api import prune_prepared
from onnxslim_bn.app.cli import main
from onnxslim_bn.app.pipeline import Pipeline
from onnxslim_bn.errors import BnSlimError
from onnxslim_bn.ir.quantized import edit_constant, fold_dequantized, restore_dequantized
from onnxslim_bn.ir.quantized import quantized as mark_of
from onnxslim_bn.ir.values import replace_constant
from onnxslim_bn.options import PruneOptions
from tests.graphs import Builder

SIZE = 12  # input height and width
DEAD = {  # layer -> its dead output channels (gamma 0, beta 0); none at the end, so a wrong slice shows
    "stem": [1, 4, 6],  # also the residual block's output: the join keeps the two alike
    "inner": [0, 3],
    "wide": [2, 5, 7, 10],
}
WIDTH = {"stem": 8, "inner": 8, "wide": 12}
CLASSES = 5
TOLERANCE = 1e-5  # relative to the largest |output|


def _alive(layer: str) -> np.ndarray:
    return np.setdiff1d(np.arange(WIDTH[layer]), DEAD[layer])


def _fp32(seed: int = 0, bn_head: bool = False) -> onnx.ModelProto:
    """stem conv-bn-relu -> (inner conv-bn-relu -> conv-bn) + stem -> relu -> wide conv-bn-relu
    -> global pool -> Gemm (``bn_head``: Gemm-BN-Relu -> Gemm, a BN the Gemm keeps). The dead
    channels of every BN are exactly zero after it."""
    b = Builder(seed)
    stem = b.op("Relu", [b.bn(b.conv("input", 3, 8), 8, np.array(DEAD["stem"]))])
    inner = b.op("Relu", [b.bn(b.conv(stem, 8, 8), 8, np.array(DEAD["inner"]))])
    back = b.bn(b.conv(inner, 8, 8), 8, np.array(DEAD["stem"]))
    joined = b.op("Relu", [b.op("Add", [stem, back])])
    wide = b.op("Relu", [b.bn(b.conv(joined, 8, 12), 12, np.array(DEAD["wide"]))])
    features = b.op("Flatten", [b.op("GlobalAveragePool", [wide])])
    if bn_head:
        features = b.op("Relu", [b.bn(b.gemm(features, 12, 16), 16)])
    head = b.gemm(features, 16 if bn_head else 12, CLASSES)
    return b.model({"input": ["batch", 3, SIZE, SIZE]}, [head])


def _samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


class _Reader(CalibrationDataReader):
    def __init__(self):
        self._batches = iter({"input": _samples(4, 100 + i)} for i in range(8))

    def get_next(self):
        return next(self._batches, None)


def _quantize(folder: Path, per_channel: bool, fmt: QuantFormat = QuantFormat.QDQ, bn_head: bool = False) -> Path:
    fp32, pre = folder / "fp32.onnx", folder / "pre.onnx"
    onnx.save(_fp32(bn_head=bn_head), fp32)
    quant_pre_process(str(fp32), str(pre))  # folds the BNs into the Convs, as onnxruntime's docs advise
    out = folder / f"{'qdq' if fmt == QuantFormat.QDQ else 'qop'}_{'channel' if per_channel else 'tensor'}.onnx"
    quantize_static(str(pre), str(out), _Reader(), quant_format=fmt, per_channel=per_channel,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[bool, Path]:
    """per_channel -> the QDQ model's file."""
    return {per_channel: _quantize(tmp_path_factory.mktemp("qdq"), per_channel) for per_channel in (True, False)}


@pytest.fixture(params=[True, False], ids=["per-channel", "per-tensor"])
def quantized(request, models):
    return request.param, models[request.param]


def _run(model: onnx.ModelProto, x: np.ndarray, optimized: bool) -> np.ndarray:
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return session.run(None, {"input": x})[0]


def _layers(model: onnx.ModelProto) -> dict[str, dict[str, list[np.ndarray]]]:
    """Per Conv / Gemm (by node name): its weight's and bias's DequantizeLinear inputs as arrays
    (integers, scale, zero point)."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    dq = {n.output[0]: [inits[i] for i in n.input] for n in model.graph.node
          if n.op_type == "DequantizeLinear" and n.input[0] in inits}
    return {n.name: {"weight": dq[n.input[1]], "bias": dq[n.input[2]]}
            for n in model.graph.node if n.op_type in ("Conv", "Gemm")}


def _kept(model: onnx.ModelProto) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Per layer (in graph order: stem, inner, back, wide, head): the kept (output, input) channels."""
    names = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    full = np.arange(3)
    keeps = [(_alive("stem"), full), (_alive("inner"), _alive("stem")), (_alive("stem"), _alive("inner")),
             (_alive("wide"), _alive("stem")), (np.arange(CLASSES), _alive("wide"))]
    return dict(zip(names, keeps))


def _signature(values) -> list:
    return [(v.name, v.type.tensor_type.elem_type, [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim])
            for v in values]


def _assert_pruned_as_integers(original: onnx.ModelProto, pruned: onnx.ModelProto, per_channel: bool) -> None:
    """The kept channels' integers, scales and zero points are the original's, sliced; a
    per-tensor scale and zero point are the original's; the activation pairs are all there."""
    before, after, kept = _layers(original), _layers(pruned), _kept(original)
    assert set(after) == set(before)
    for name, (out, inp) in kept.items():
        axis_out = 0  # Conv [C_out, C_in, k, k]; the Gemm is transB: [N, K]
        q, scale, zero = before[name]["weight"]
        q2, scale2, zero2 = after[name]["weight"]
        assert q2.dtype == q.dtype == np.int8
        np.testing.assert_array_equal(q2, q[np.ix_(out, inp)] if q.ndim == 2 else q[out][:, inp])
        if per_channel:
            assert scale.shape == (q.shape[axis_out],) and len(np.unique(scale)) > 1
            np.testing.assert_array_equal(scale2, scale[out])
            np.testing.assert_array_equal(zero2, zero[out])
        else:
            assert scale.size == 1
            np.testing.assert_array_equal(scale2, scale)
            np.testing.assert_array_equal(zero2, zero)
        b, b_scale, b_zero = before[name]["bias"]
        b2, b_scale2, b_zero2 = after[name]["bias"]
        assert b2.dtype == b.dtype == np.int32
        np.testing.assert_array_equal(b2, b[out])  # the dead channels' constants are 0: nothing to fold in
        np.testing.assert_array_equal(b_scale2, b_scale[out] if b_scale.size > 1 else b_scale)
        np.testing.assert_array_equal(b_zero2, b_zero[out] if b_zero.size > 1 else b_zero)
    pairs = [n.op_type for n in original.graph.node if n.op_type == "QuantizeLinear"]
    assert [n.op_type for n in pruned.graph.node if n.op_type == "QuantizeLinear"] == pairs
    assert _signature(pruned.graph.input) == _signature(original.graph.input)
    assert _signature(pruned.graph.output) == _signature(original.graph.output)


def _assert_same_outputs(original: onnx.ModelProto, pruned: onnx.ModelProto) -> float:
    """Both INT8 models in onnxruntime, as deployed (INT8 kernels) and as written (float
    simulation of the pairs): the pruned one gives the original's outputs to 1e-5 relative."""
    x = _samples(24, 7)
    worst = 0.0
    for optimized in (True, False):
        want, got = _run(original, x, optimized), _run(pruned, x, optimized)
        assert got.shape == want.shape == (24, CLASSES)
        worst = max(worst, float(np.abs(got - want).max() / np.abs(want).max()))
    assert worst <= TOLERANCE
    return worst


def test_qdq_model_prunes_its_integers_exactly(quantized):
    per_channel, source = quantized
    original = onnx.load(str(source))
    result = onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False)
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert result.report.removed_channels == sum(len(d) for d in DEAD.values())
    _assert_pruned_as_integers(original, pruned, per_channel)
    _assert_same_outputs(original, pruned)
    assert result.report.verification.max_rel_diff <= TOLERANCE  # the run's own check, as deployed
    assert len(pruned.SerializeToString()) < source.stat().st_size
    entries = [sum(numpy_helper.to_array(t).size for t in m.graph.initializer) for m in (original, pruned)]
    assert entries[1] < entries[0]
    assert result.report.after.macs < result.report.before.macs
    assert result.report.after.channels == result.report.before.channels - 3 * 2 - 2 - 4


def test_with_data_the_channels_rank_by_data_and_the_refit_leaves_the_integers(models):
    """--data: data importance reads the dequantized weights; the refit (the default with data)
    would compute float weights, so it leaves every layer of a QDQ model as bias folding made it."""
    source = models[True]
    original = onnx.load(str(source))
    result = onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False, data={"input": _samples(128, 11)})
    assert result.report.removed_channels == sum(len(d) for d in DEAD.values())
    assert any("importance: data" in n for n in result.report.notes)
    left = [n for n in result.report.notes if "INT8 behind a DequantizeLinear" in n]
    assert len(left) == 4  # the four layers whose input channels went
    _assert_pruned_as_integers(original, result.model, True)
    _assert_same_outputs(original, result.model)


def test_a_relu_the_quantizer_absorbed_still_marks_a_folded_conv_bn_relu(tmp_path):
    """With a BN kept in the head, a biased conv counts as folded Conv-BN only when an activation
    follows it. onnxruntime's QDQ quantizer drops those Relus (a uint8 QuantizeLinear at zero point
    0 clips at zero): the QDQ model ranks and prunes the same channels as its FP32 model."""
    source = _quantize(tmp_path, True, bn_head=True)
    ops = [n.op_type for n in onnx.load(str(source)).graph.node]
    assert "BatchNormalization" in ops and "Relu" not in ops
    fp32 = onnxslim_bn.prune(str(tmp_path / "pre.onnx"), threshold=1e-3, round_to=1, probe=False)
    qdq = onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False)
    assert qdq.report.removed_channels == fp32.report.removed_channels == sum(len(d) for d in DEAD.values())
    _assert_same_outputs(onnx.load(str(source)), qdq.model)


def test_scales_follow_their_channels(models):
    """The pruned model with each sliced per-channel scale replaced by the first entries of the
    original's (the scales of other channels: what slicing the integers alone would give) is far
    from the original; the tool's model is not."""
    source = models[True]
    original = onnx.load(str(source))
    pruned = onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False).model
    inits = {t.name: t for t in pruned.graph.initializer}
    first = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    wrong = onnx.ModelProto()
    wrong.CopyFrom(pruned)
    for n in wrong.graph.node:
        if n.op_type == "DequantizeLinear" and inits.get(n.input[0]) is not None and inits[n.input[0]].data_type == \
                onnx.TensorProto.INT8 and inits[n.input[1]].dims and inits[n.input[1]].dims[0] > 1:
            k = inits[n.input[1]].dims[0]
            t = next(t for t in wrong.graph.initializer if t.name == n.input[1])
            t.CopyFrom(numpy_helper.from_array(first[n.input[1]][:k], n.input[1]))
    x = _samples(24, 7)
    want = _run(original, x, False)
    assert np.abs(_run(wrong, x, False) - want).max() / np.abs(want).max() > 100 * TOLERANCE
    assert np.abs(_run(pruned, x, False) - want).max() / np.abs(want).max() <= TOLERANCE


def test_cli_prunes_a_qdq_model(quantized, tmp_path, capsys):
    per_channel, source = quantized
    out = tmp_path / "slim.onnx"
    code = main([str(source), "-o", str(out), "--threshold", "1e-3", "--round-to", "1", "--no-probe"])
    assert code == 0, capsys.readouterr().err
    pruned, original = onnx.load(str(out)), onnx.load(str(source))
    _assert_pruned_as_integers(original, pruned, per_channel)
    worst = _assert_same_outputs(original, pruned)
    assert out.stat().st_size < source.stat().st_size
    print(f"{'per-channel' if per_channel else 'per-tensor'}: {source.stat().st_size} -> {out.stat().st_size} bytes, "
          f"max relative diff {worst:.3g}")


def test_qoperator_input_is_refused_in_one_line(tmp_path, capsys):
    source = _quantize(tmp_path, True, QuantFormat.QOperator)
    before = hashlib.sha256(source.read_bytes()).hexdigest()
    code = main([str(source), "-o", str(tmp_path / "slim.onnx"), "--threshold", "1e-3", "--no-probe"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert str(source) in err and "QOperator" in err and "QLinearConv" in err and "quant_format=QuantFormat.QDQ" in err
    assert not (tmp_path / "slim.onnx").exists() and hashlib.sha256(source.read_bytes()).hexdigest() == before
    with pytest.raises(BnSlimError, match="prunes QDQ models"):
        onnxslim_bn.prune(str(source), threshold=1e-3, probe=False)


def test_quantize_int8_on_a_qdq_input_is_refused_in_one_line(quantized, tmp_path, capsys):
    _, source = quantized
    data = tmp_path / "data.npz"
    np.savez(data, input=_samples(128, 3))
    out = tmp_path / "slim.onnx"
    code = main([str(source), "-o", str(out), "--threshold", "1e-3", "--quantize", "int8", "--data", str(data),
                 "--no-probe"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1
    assert str(source) in err and "already quantized (QDQ)" in err and "drop --quantize int8" in err
    assert not out.exists()
    # without --data too: the refusal that is the fix comes first, not "pass --data"
    code = main([str(source), "-o", str(out), "--threshold", "1e-3", "--quantize", "int8", "--no-probe"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "already quantized (QDQ)" in err and "--data" not in err
    assert not out.exists()


def test_removed_constants_fold_into_the_int32_bias_at_its_scale(tmp_path):
    """Dead channels with beta != 0 output a constant: the next layer (a 1x1 conv, so exact at
    every pixel) absorbs it into its bias, quantized again at the bias's own scale; its weights
    stay the original's integers and the output the original's."""
    b = Builder(3)
    first = b.op("Relu", [b.bn(b.conv("input", 3, 8), 8, np.array([1, 4, 6]), beta_dead=0.7)])
    second = b.op("Relu", [b.bn(b.conv(first, 8, 8, k=1, pad=0), 8, np.array([0, 3]), beta_dead=0.4)])
    head = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [second])]), 8, CLASSES)
    fp32, pre, source = tmp_path / "fp32.onnx", tmp_path / "pre.onnx", tmp_path / "qdq.onnx"
    onnx.save(b.model({"input": ["batch", 3, SIZE, SIZE]}, [head]), fp32)
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(source), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    original = onnx.load(str(source))
    result = onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False)
    assert result.report.removed_channels == 5 and result.report.surgery.compensated_layers == 2
    before, after = _layers(original), _layers(result.model)
    conv2 = [n.name for n in original.graph.node if n.op_type == "Conv"][1]
    keep_out, keep_in = np.setdiff1d(np.arange(8), [0, 3]), np.setdiff1d(np.arange(8), [1, 4, 6])
    q, scale, _ = before[conv2]["weight"]
    np.testing.assert_array_equal(after[conv2]["weight"][0], q[keep_out][:, keep_in])
    np.testing.assert_array_equal(after[conv2]["weight"][1], scale[keep_out])
    bias, bias_scale, _ = before[conv2]["bias"]
    moved = after[conv2]["bias"][0].astype(np.int64) - bias[keep_out]
    assert after[conv2]["bias"][0].dtype == np.int32 and np.any(moved != 0)
    np.testing.assert_array_equal(after[conv2]["bias"][1], bias_scale[keep_out])
    # the shift is the removed channels' constant through the weights, at the bias's scale
    w = (q.astype(np.float64) * scale[:, None, None, None])[keep_out][:, [1, 4, 6]].sum(axis=(2, 3))
    act_scale, act_zero = _activation_pair(original, conv2)
    constant = (np.rint(0.7 / act_scale) + act_zero - act_zero) * act_scale  # beta through the activation's Q/DQ
    np.testing.assert_array_equal(moved, np.rint(w.sum(axis=1) * constant / bias_scale[keep_out].astype(np.float64)))
    _assert_same_outputs(original, result.model)


def _activation_pair(model: onnx.ModelProto, layer: str) -> tuple[float, float]:
    """The per-tensor scale and zero point of the DequantizeLinear that feeds ``layer``'s input."""
    inits = {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.name == layer)
    dq = next(n for n in model.graph.node if n.output[0] == node.input[0])
    return float(inits[dq.input[1]]), float(inits[dq.input[2]])


def _matmul_graph(per_channel: bool):
    """x [2, 4] @ DequantizeLinear(int8 [4, 6], scale, zero point, axis 1) -> y [2, 6]."""
    rng = np.random.default_rng(0)
    data = rng.integers(-128, 128, (4, 6)).astype(np.int8)
    scale = (rng.uniform(0.5, 2.0, 6) if per_channel else np.array(0.3)).astype(np.float32)
    zero = (rng.integers(-3, 4, 6) if per_channel else np.array(1)).astype(np.int8)
    x, w, y = gs.Variable("x", np.float32, [2, 4]), gs.Variable("w", np.float32, [4, 6]), gs.Variable("y", np.float32)
    dq = gs.Node("DequantizeLinear", "dq", {"axis": 1}, inputs=[gs.Constant("q", data), gs.Constant("s", scale),
                                                               gs.Constant("z", zero)], outputs=[w])
    graph = gs.Graph([dq, gs.Node("MatMul", "mm", inputs=[x, w], outputs=[y])], [x], [y], opset=17)
    return graph, data, scale, zero


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_a_quantized_constant_slices_its_scale_only_on_its_own_axis(per_channel):
    graph, data, scale, zero = _matmul_graph(per_channel)
    assert fold_dequantized(graph) == 1
    layer = graph.nodes[0]
    dequantized = (data.astype(np.float32) - (zero if zero.ndim == 0 else zero[None])) * scale
    np.testing.assert_array_equal(layer.inputs[1].values, dequantized)
    assert mark_of(layer.inputs[1]).axis == (1 if per_channel else None)
    rows, cols = np.array([0, 2, 3]), np.array([1, 2, 5])
    edit_constant(layer, 1, lambda a, axis: np.take(a, rows, axis=axis), 0)  # input rows: the scale stays
    edit_constant(layer, 1, lambda a, axis: np.take(a, cols, axis=axis), 1)  # output columns: sliced with it
    restored = restore_dequantized(graph)
    assert restored.integers == 1 and not restored.requantized and not restored.left_float
    dq = layer.inputs[1].inputs[0]
    q, s, z = (t.values for t in dq.inputs)
    np.testing.assert_array_equal(q, data[np.ix_(rows, cols)])
    assert q.dtype == np.int8 and dq.attrs == {"axis": 1}
    np.testing.assert_array_equal(s, scale[cols] if per_channel else scale)
    np.testing.assert_array_equal(z, zero[cols] if per_channel else zero)
    if not per_channel:  # unchanged: the very tensors of the input
        assert dq.inputs[1].name == "s" and dq.inputs[2].name == "z"


def test_a_quantized_weight_changed_otherwise_stays_float():
    graph, *_ = _matmul_graph(True)
    fold_dequantized(graph)
    layer = graph.nodes[0]
    replace_constant(layer, 1, layer.inputs[1].values * 1.5)  # not a slice: no integers stand for it
    restored = restore_dequantized(graph)
    assert restored.left_float == (layer.inputs[1].name,) and restored.integers == 0
    assert layer.inputs[1].values.dtype == np.float32 and not any(n.op == "DequantizeLinear" for n in graph.nodes)


def test_a_bias_the_compensation_adds_is_int32_at_input_times_weight_scale(tmp_path):
    """A bias-less 1x1 conv behind dead channels with beta != 0 gets a bias from the compensation:
    written as onnxruntime writes one (int32, scale input_scale * weight_scale per output channel,
    zero point 0), and the output stays the original's."""
    b = Builder(5)
    first = b.op("Relu", [b.bn(b.conv("input", 3, 8), 8, np.array([2, 5]), beta_dead=0.6)])
    second = b.op("Relu", [b.conv(first, 8, 6, k=1, pad=0)])
    head = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [second])]), 6, CLASSES)
    fp32, pre, source = tmp_path / "fp32.onnx", tmp_path / "pre.onnx", tmp_path / "qdq.onnx"
    onnx.save(b.model({"input": ["batch", 3, SIZE, SIZE]}, [head]), fp32)
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(source), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    original = onnx.load(str(source))
    conv2 = [n for n in original.graph.node if n.op_type == "Conv"][1]
    assert len(conv2.input) == 2  # no bias
    with pytest.raises(onnxslim_bn.BnSlimError, match="would exceed the input's"):  # 2 int8 channels < a new bias
        onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False)
    result = onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False, allow_growth=True)
    assert result.report.removed_channels == 2
    inits = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    node = next(n for n in result.model.graph.node if n.name == conv2.name)
    dq = {n.output[0]: n for n in result.model.graph.node if n.op_type == "DequantizeLinear"}
    q, scale, zero = (inits[i] for i in dq[node.input[2]].input)
    w_scale = inits[dq[node.input[1]].input[1]]
    in_scale, _ = _activation_pair(original, conv2.name)
    assert q.dtype == np.int32 and np.any(q != 0) and not np.any(zero)
    np.testing.assert_array_equal(scale, (w_scale * np.float32(in_scale)).astype(np.float32))
    _assert_same_outputs(original, result.model)


def test_one_preparation_serves_every_cut(models):
    """Cuts A, B, A on one Pipeline (sweep, latency attempts) give the models fresh runs give:
    the surgery's slices of integers, scales and zero points are put back after each cut."""
    source = models[True]
    a = PruneOptions(threshold=1e-3, round_to=1, probe=False)
    b = PruneOptions(ratio=0.4, round_to=1, probe=False)
    shared = Pipeline(str(source))
    runs = [prune_prepared(shared, o).model.SerializeToString() for o in (a, b, a)]
    fresh = [onnxslim_bn.prune(str(source), o).model.SerializeToString() for o in (a, b)]
    assert runs == [fresh[0], fresh[1], fresh[0]] and runs[0] != runs[1]


def test_per_channel_activation_pairs_are_sliced_with_the_channels(tmp_path):
    """A QuantizeLinear / DequantizeLinear pair per channel (axis 1) on an activation: its scale
    and zero point lose the removed channels' entries; the output stays the original's."""
    rng = np.random.default_rng(2)
    dead = [1, 3]
    w1 = rng.integers(-100, 100, (6, 3, 3, 3)).astype(np.int8)
    w1[dead] = 0
    b1 = rng.integers(-2000, 2000, 6).astype(np.int32)
    b1[dead] = 0
    w2 = rng.integers(-100, 100, (4, 6, 1, 1)).astype(np.int8)
    act_scale = rng.uniform(0.01, 0.05, 6).astype(np.float32)
    act_zero = rng.integers(0, 20, 6).astype(np.uint8)
    inits = [numpy_helper.from_array(v, n) for n, v in [
        ("w1q", w1), ("w1s", np.float32(0.01)), ("b1q", b1), ("b1s", np.float32(1e-4)),
        ("w2q", w2), ("w2s", np.float32(0.01)), ("as", act_scale), ("az", act_zero)]]
    h = onnx.helper
    nodes = [h.make_node("DequantizeLinear", ["w1q", "w1s"], ["w1"], name="dq_w1"),
             h.make_node("DequantizeLinear", ["b1q", "b1s"], ["b1"], name="dq_b1"),
             h.make_node("DequantizeLinear", ["w2q", "w2s"], ["w2"], name="dq_w2"),
             h.make_node("Conv", ["input", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             h.make_node("QuantizeLinear", ["c1", "as", "az"], ["q1"], name="q1", axis=1),
             h.make_node("DequantizeLinear", ["q1", "as", "az"], ["d1"], name="d1", axis=1),
             h.make_node("Conv", ["d1", "w2"], ["output"], name="conv2")]
    graph = h.make_graph(nodes, "pc", [h.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 3, SIZE, SIZE])],
                         [h.make_tensor_value_info("output", onnx.TensorProto.FLOAT, ["batch", 4, SIZE, SIZE])], inits)
    model = h.make_model(graph, opset_imports=[h.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    source = tmp_path / "pc.onnx"
    onnx.save(model, source)
    result = onnxslim_bn.prune(str(source), threshold=1e-6, round_to=1, probe=False)
    assert result.report.removed_channels == 2
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    keep = np.setdiff1d(np.arange(6), dead)
    np.testing.assert_array_equal(after["as"], act_scale[keep])
    np.testing.assert_array_equal(after["az"], act_zero[keep])
    np.testing.assert_array_equal(after["w2q"], w2[:, keep])
    np.testing.assert_array_equal(after["w2s"], np.float32(0.01))
    x = _samples(8, 4)
    for optimized in (True, False):
        want, got = _run(model, x, optimized), _run(result.model, x, optimized)
        assert np.abs(got - want).max() <= TOLERANCE * np.abs(want).max()


def test_inputs_of_a_weight_quantized_along_its_outputs_keep_its_scale(tmp_path):
    """A MatMul / Gemm weight [K, N] quantized per output channel (axis 1): the removed input rows
    go, its N scales and zero points stay, and the output stays the original's."""
    b = Builder(0)
    feature = b.op("Relu", [b.bn(b.conv("input", 3, 8), 8, np.array([1, 4, 6]))])
    flat = b.op("Flatten", [b.op("GlobalAveragePool", [feature])])
    rng = np.random.default_rng(1)
    hidden = b.op("Relu", [b.op("Add", [b.op("MatMul", [flat, b.const(rng.standard_normal((8, 6)).astype(np.float32), "mw")]),
                                        b.const(np.full(6, 0.1, np.float32), "mb")])])
    out = b.op("MatMul", [hidden, b.const(rng.standard_normal((6, CLASSES)).astype(np.float32), "mw")])
    fp32, pre, source = tmp_path / "fp32.onnx", tmp_path / "pre.onnx", tmp_path / "qdq.onnx"
    onnx.save(b.model({"input": ["batch", 3, SIZE, SIZE]}, [out]), fp32)
    quant_pre_process(str(fp32), str(pre))
    quantize_static(str(pre), str(source), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    original = onnx.load(str(source))
    before = {t.name: numpy_helper.to_array(t) for t in original.graph.initializer}
    layer = next(n for n in original.graph.node if n.op_type in ("Gemm", "MatMul") and n.input[0] != "input")
    dq = next(n for n in original.graph.node if n.output[0] == layer.input[1])
    assert [a.i for a in dq.attribute if a.name == "axis"] == [1] and before[dq.input[1]].shape == (6,)
    result = onnxslim_bn.prune(str(source), threshold=1e-3, round_to=1, probe=False)
    assert result.report.removed_channels == 3
    after = {t.name: numpy_helper.to_array(t) for t in result.model.graph.initializer}
    np.testing.assert_array_equal(after[dq.input[0]], before[dq.input[0]][np.setdiff1d(np.arange(8), [1, 4, 6])])
    np.testing.assert_array_equal(after[dq.input[1]], before[dq.input[1]])
    np.testing.assert_array_equal(after[dq.input[2]], before[dq.input[2]])
    _assert_same_outputs(original, result.model)

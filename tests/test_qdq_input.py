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
import onnxruntime as ort
import pytest
from onnx import numpy_helper
from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
from onnxruntime.quantization.shape_inference import quant_pre_process

import onnxslim_bn
from onnxslim_bn.app.cli import main
from onnxslim_bn.errors import BnSlimError
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


def _fp32(seed: int = 0) -> onnx.ModelProto:
    """stem conv-bn-relu -> (inner conv-bn-relu -> conv-bn) + stem -> relu -> wide conv-bn-relu
    -> global pool -> Gemm. The dead channels of every BN are exactly zero after it."""
    b = Builder(seed)
    stem = b.op("Relu", [b.bn(b.conv("input", 3, 8), 8, np.array(DEAD["stem"]))])
    inner = b.op("Relu", [b.bn(b.conv(stem, 8, 8), 8, np.array(DEAD["inner"]))])
    back = b.bn(b.conv(inner, 8, 8), 8, np.array(DEAD["stem"]))
    joined = b.op("Relu", [b.op("Add", [stem, back])])
    wide = b.op("Relu", [b.bn(b.conv(joined, 8, 12), 12, np.array(DEAD["wide"]))])
    head = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [wide])]), 12, CLASSES)
    return b.model({"input": ["batch", 3, SIZE, SIZE]}, [head])


def _samples(count: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((count, 3, SIZE, SIZE)).astype(np.float32)


class _Reader(CalibrationDataReader):
    def __init__(self):
        self._batches = iter({"input": _samples(4, 100 + i)} for i in range(8))

    def get_next(self):
        return next(self._batches, None)


def _quantize(folder: Path, per_channel: bool, fmt: QuantFormat = QuantFormat.QDQ) -> Path:
    fp32, pre = folder / "fp32.onnx", folder / "pre.onnx"
    onnx.save(_fp32(), fp32)
    quant_pre_process(str(fp32), str(pre))  # folds the BNs into the Convs, as onnxruntime's docs advise
    out = folder / f"{'qdq' if fmt == QuantFormat.QDQ else 'qop'}_{'channel' if per_channel else 'tensor'}.onnx"
    quantize_static(str(pre), str(out), _Reader(), quant_format=fmt, per_channel=per_channel,
                    weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8)
    return out


@pytest.fixture(scope="module", params=[True, False], ids=["per-channel", "per-tensor"])
def quantized(request, tmp_path_factory):
    return request.param, _quantize(tmp_path_factory.mktemp("qdq"), request.param)


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


def test_scales_follow_their_channels(quantized, tmp_path):
    """The pruned model with each sliced per-channel scale replaced by the first entries of the
    original's (the scales of other channels: what slicing the integers alone would give) is far
    from the original; the tool's model is not."""
    per_channel, source = quantized
    if not per_channel:
        pytest.skip("per-tensor scales are not sliced")
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

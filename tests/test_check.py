"""The check of the pruned model: sample counts, per-output metrics, NaN/Inf, gates, reports."""

from __future__ import annotations

import json
import shutil

import numpy as np
import onnx
import onnxruntime as ort
import pytest
from onnx import TensorProto

from onnxslim_bn import prune
from onnxslim_bn.app.cli import main
from onnxslim_bn.errors import BnSlimError, CheckFailed
from onnxslim_bn.ir.runtime import run
from onnxslim_bn.passes.verify import compare_output
from tests.fixtures import heldout, path
from tests.graphs import Builder


def _net(b: Builder, x: str, cin: int = 4, mid: int = 8, cout: int = 4) -> str:
    """conv -> BN (all channels alive) -> relu -> conv: pruning at any ratio changes the output."""
    h = b.op("Relu", [b.bn(b.conv(x, cin, mid), mid)])
    return b.conv(h, mid, cout)


def _session(model: onnx.ModelProto) -> ort.InferenceSession:
    return ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])


def _head(b: Builder, y: str) -> str:
    return b.op("Flatten", [b.op("GlobalAveragePool", [y])])


def test_nan_in_both_models_does_not_hide_a_difference_on_another_output():
    b = Builder(seed=3)
    root = b.op("Sqrt", ["x"])  # NaN wherever the N(0,1) input is negative, in both models
    logits = _head(b, _net(b, "x"))
    model = b.model({"x": ["N", 4, 8, 8]}, [root, logits])
    with pytest.raises(CheckFailed) as info:
        prune(model, ratio=0.5, round_to=1, max_error=0.01)
    v = info.value.report.verification
    assert "exceeds --max-error" in str(info.value) and f"output '{logits}'" in str(info.value)
    assert f"output '{root}'" not in v.failed  # the NaN output itself is alike in both models
    sqrt = v.outputs[0]
    assert sqrt.nonfinite > 0 and sqrt.nonfinite_mismatch == 0
    assert sqrt.max_abs_diff == 0.0 and sqrt.cosine == pytest.approx(1.0, abs=1e-12)  # over its finite positions
    assert v.outputs[1].max_abs_diff > 0.01 and np.isfinite(v.max_abs_diff)
    assert any("NaN/Inf at" in n and "alike" in n for n in v.notes)


def test_nan_pattern_that_changes_fails_without_any_gate():
    b = Builder(seed=4)
    y = b.op("Sqrt", [_net(b, "x")])  # NaN where the pruned conv output turns negative
    model = b.model({"x": ["N", 4, 8, 8]}, [y])
    with pytest.raises(CheckFailed) as info:
        prune(model, ratio=0.5, round_to=1)
    out = info.value.report.verification.outputs[0]
    assert out.nonfinite_mismatch > 0 and "NaN/Inf at" in str(info.value)


def test_compare_output_tells_nan_from_inf_and_ignores_non_finite_positions():
    a = np.array([[1.0, np.nan, np.inf, 2.0]], np.float32)
    same = compare_output("y", a, a.copy(), 1, None)
    assert (same.nonfinite, same.nonfinite_mismatch, same.max_abs_diff) == (2, 0, 0.0)
    assert same.cosine == pytest.approx(1.0, abs=1e-12)
    b = np.array([[1.0, np.inf, np.inf, 3.0]], np.float32)
    diff = compare_output("y", a, b, 1, None)
    assert diff.nonfinite_mismatch == 1 and diff.max_abs_diff == 1.0 and diff.max_rel_diff == 0.5


def test_near_constant_output_gets_a_note_on_random_inputs():
    b = Builder(seed=5)
    body = _net(b, "x")
    flat = b.op("Sigmoid", [b.op("Add", [body, b.const(np.float32(-30.0))])])  # ~1e-13 on noise: never exercised
    live = _head(b, body)
    model = b.model({"x": ["N", 4, 8, 8]}, [flat, live])
    v = prune(model, ratio=0.25, round_to=1).report.verification
    assert v.outputs[0].near_constant and not v.outputs[1].near_constant
    notes = [n for n in v.notes if "do not exercise" in n]
    assert len(notes) == 1 and f"output '{flat}'" in notes[0] and "pass --data" in notes[0]


def test_default_check_runs_32_seeded_samples_not_used_for_calibration():
    b = Builder(seed=6)
    model = b.model({"x": ["N", 4, 8, 8]}, [_head(b, _net(b, "x"))])
    result = prune(model, ratio=0.25, round_to=1)
    v = result.report.verification
    assert v.samples == 32 and v.random and result.check_inputs["x"].shape == (32, 4, 8, 8)
    assert v.inputs == "32 seeded N(0,1) samples, not used for calibration"
    assert "32 seeded N(0,1) samples" in result.report.table()
    # the numbers are onnxruntime's on exactly those inputs
    want = _session(model).run(None, result.check_inputs)[0]
    got = _session(result.model).run(None, result.check_inputs)[0]
    assert v.max_abs_diff == pytest.approx(float(np.abs(want - got).max()), rel=1e-6, abs=1e-7)
    assert v.outputs[0].top1_agreement == pytest.approx(float((want.argmax(1) == got.argmax(1)).mean()))


def _fixed_batch_model(batch: int) -> onnx.ModelProto:
    b = Builder(seed=7)
    return b.model({"x": [batch, 4, 8, 8]}, [_head(b, _net(b, "x"))])


def test_fixed_batch_with_a_sample_count_that_is_not_a_multiple(tmp_path):
    model = _fixed_batch_model(4)
    x = np.random.default_rng(0).standard_normal((10, 4, 8, 8)).astype(np.float32)
    np.savez(tmp_path / "d.npz", x=x)
    result = prune(model, ratio=0.25, round_to=1, data=str(tmp_path / "d.npz"))
    v = result.report.verification
    assert v.samples == 10 and v.outputs[0].shape == [10, 4]
    assert any("fixed at 4" in n and "padded" in n for n in v.notes)
    before, after = _session(model), _session(result.model)
    want = np.concatenate([before.run(None, {"x": x[i:i + 4]})[0] for i in (0, 4)] +
                          [before.run(None, {"x": np.concatenate([x[8:], x[9:], x[9:]])})[0][:2]])
    got = np.concatenate([after.run(None, {"x": x[i:i + 4]})[0] for i in (0, 4)] +
                         [after.run(None, {"x": np.concatenate([x[8:], x[9:], x[9:]])})[0][:2]])
    assert v.max_abs_diff == pytest.approx(float(np.abs(want - got).max()), rel=1e-6, abs=1e-7)
    assert len(result.check_inputs["x"]) == 12  # whole batches, for the OpenVINO check


def test_fixed_batch_without_data_rounds_the_check_up_to_whole_batches():
    result = prune(_fixed_batch_model(3), ratio=0.25, round_to=1)
    assert result.report.verification.samples == 33 and not result.report.verification.notes


def test_run_joins_chunks_and_drops_padding_on_a_non_leading_batch_axis():
    b = Builder(seed=8)
    y = b.op("Transpose", ["x"], perm=[1, 0, 2])  # [T, N, K], like a CRNN's output
    model = b.model({"x": [2, 5, 3]}, [y])
    x = np.arange(7 * 5 * 3, dtype=np.float32).reshape(7, 5, 3)
    (out,) = run(_session(model), {"x": x}, 2)
    np.testing.assert_array_equal(out, x.transpose(1, 0, 2))


def test_top1_only_on_class_like_outputs():
    b = Builder(seed=9)
    body = _net(b, "x")
    logits = _head(b, body)  # [N, 4]: class scores
    seq_in = b.op("Reshape", [b.op("Transpose", [body], perm=[0, 2, 3, 1]), b.const(np.array([0, -1, 4]))])
    seq = b.op("MatMul", [seq_in, b.const(np.eye(4, 6, dtype=np.float32))])  # [N, 64, 6] sequence of class scores
    soft_wrong_axis = b.op("Softmax", [seq], axis=1)  # over the sequence, not the classes
    model = b.model({"x": ["N", 4, 8, 8]}, [logits, body, seq, soft_wrong_axis])
    v = prune(model, ratio=0.25, round_to=1).report.verification
    by_name = {o.name: o for o in v.outputs}
    assert by_name[logits].top1_agreement is not None and by_name[logits].top1_positions == 32
    assert by_name[body].top1_agreement is None  # a [N, C, H, W] map
    assert by_name[seq].top1_agreement is not None and by_name[seq].top1_positions == 32 * 64
    assert by_name[soft_wrong_axis].top1_agreement is None
    table = prune(model, ratio=0.25, round_to=1).report.table()
    assert f"'{seq}' [32, 64, 6]" in table and "over 2048 positions" in table


@pytest.mark.parametrize("gate, value, phrase", [("max_rel_error", 1e-6, "--max-rel-error"),
                                                 ("min_cosine", 0.9999999, "--min-cosine")])
def test_relative_gates_fail_with_the_reason(gate, value, phrase):
    b = Builder(seed=10)
    model = b.model({"x": ["N", 4, 8, 8]}, [_head(b, _net(b, "x"))])
    with pytest.raises(CheckFailed, match=phrase):
        prune(model, ratio=0.5, round_to=1, **{gate: value})
    loose = prune(model, ratio=0.5, round_to=1, **{gate: 1.0 if gate == "max_rel_error" else -1.0})
    assert loose.report.verification.failed is None


def test_bad_gate_values_are_one_line_errors():
    for kwargs in ({"min_cosine": 1.5}, {"max_rel_error": -1.0}, {"max_error": float("nan")}, {"check_samples": 0}):
        with pytest.raises(BnSlimError, match="--"):
            prune(str(path("vgg")), ratio=0.1, **kwargs)


def test_failed_gate_still_writes_the_report_and_no_model(tmp_path, capsys):
    model = tmp_path / "vgg.onnx"
    shutil.copy(path("vgg"), model)
    report = tmp_path / "report.json"
    assert main([str(model), "--ratio", "0.9", "--max-error", "1e-9", "--report", str(report)]) == 1
    err = capsys.readouterr().err
    assert "exceeds --max-error" in err and len(err.strip().splitlines()) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["report.json", "vgg.onnx"]
    data = json.loads(report.read_text())
    assert "exceeds --max-error" in data["verification"]["failed"]
    assert data["verification"]["samples"] == 32 and data["verification"]["max_abs_diff"] > 1e-9


def _folded_data(n: int) -> dict[str, np.ndarray]:
    return {"input": heldout()[0][:n]}


def test_calibration_and_check_samples_are_disjoint():
    model = str(path("resnet", "ts-folded"))  # folded BN: calibration runs
    result = prune(model, ratio=0.3, data=_folded_data(100), compensation="bias")
    v = result.report.verification
    assert (v.calibration_samples, v.samples, v.disjoint) == (50, 50, True)
    assert v.inputs == "50 samples of in-memory arrays [50:100], not used for calibration"
    np.testing.assert_array_equal(result.check_inputs["input"], heldout()[0][50:100])
    # the calibration used the first half: the same scores as calibrating on those 50 alone
    alone = prune(model, ratio=0.3, data=_folded_data(50), compensation="bias")
    assert [s.scores for s in result.report.spaces] == [s.scores for s in alone.report.spaces]
    assert alone.report.verification.disjoint is False and alone.report.verification.samples == 50
    assert any("fewer than the 64" in n and "all 50 serve both" in n for n in alone.report.notes)
    assert alone.report.verification.inputs.endswith("also used for calibration")
    chosen = prune(model, ratio=0.3, data=_folded_data(100), calibration_samples=70,
                   compensation="bias").report.verification
    assert (chosen.calibration_samples, chosen.samples) == (70, 30)


def test_data_without_calibration_checks_on_every_sample():
    # BN kept (no scale recovery) and bias folding (no reconstruction): nothing calibrates
    v = prune(str(path("resnet")), ratio=0.3, data=_folded_data(100), compensation="bias").report.verification
    assert (v.calibration_samples, v.samples) == (0, 100)
    assert v.inputs == "100 samples of in-memory arrays, not used for calibration"


def test_reconstruction_calibrates_on_its_own_share():
    v = prune(str(path("resnet")), ratio=0.3, data=_folded_data(80), compensation="reconstruct").report.verification
    assert (v.calibration_samples, v.samples, v.disjoint) == (40, 40, True)


def test_integer_input_without_data_asks_for_data():
    b = Builder(seed=11)
    y = _head(b, _net(b, b.op("Cast", ["x"], to=TensorProto.FLOAT)))
    model = b.model({"x": ["N", 4, 8, 8]}, [y])
    model.graph.input[0].type.tensor_type.elem_type = TensorProto.INT64
    onnx.checker.check_model(model, full_check=True)
    with pytest.raises(BnSlimError, match="int64 tensor.*pass real inputs with --data"):
        prune(model, ratio=0.25, round_to=1)
    ints = np.random.default_rng(0).integers(-3, 4, (40, 4, 8, 8))
    v = prune(model, ratio=0.25, round_to=1, data={"x": ints}).report.verification
    assert v.samples == 40 and not v.random


def test_report_json_records_check_counts_and_per_output_metrics(tmp_path):
    b = Builder(seed=12)
    body = _net(b, "x")
    model = b.model({"x": ["N", 4, 8, 8]}, [body, _head(b, body)])
    data = prune(model, ratio=0.25, round_to=1).report.to_dict()["verification"]
    assert data["samples"] == 32 and data["calibration_samples"] == 0 and data["failed"] is None
    assert [o["samples"] for o in data["outputs"]] == [32, 32]
    assert data["max_rel_diff"] == max(o["max_rel_diff"] for o in data["outputs"])
    assert data["top1_agreement"] == data["outputs"][1]["top1_agreement"]
    json.dumps(data)


def test_scalar_input_is_fed_whole_to_every_chunk():
    b = Builder(seed=13)
    y = _head(b, b.op("Mul", [_net(b, "x"), "t"]))
    model = b.model({"x": [2, 4, 8, 8], "t": []}, [y])  # a fixed batch of 2: 16 chunks
    result = prune(model, ratio=0.25, round_to=1)
    feeds = result.check_inputs
    assert feeds["t"].shape == () and feeds["x"].shape == (32, 4, 8, 8)
    def outputs(m: onnx.ModelProto) -> np.ndarray:
        sess = _session(m)
        return np.concatenate([sess.run(None, {"x": feeds["x"][i:i + 2], "t": feeds["t"]})[0] for i in range(0, 32, 2)])

    want, got = outputs(model), outputs(result.model)
    assert result.report.verification.max_abs_diff == pytest.approx(float(np.abs(want - got).max()), rel=1e-6, abs=1e-7)

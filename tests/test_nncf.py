"""--quantize int8 --openvino DIR with NNCF (onnxslim_bn.passes.openvino_int8): NNCF's INT8 IR of
the pruned FP32 model, checked against the FP32 original; the QDQ-read route when nncf is missing.

nncf is in the test extra; the tests that run it skip, saying so, only where it is not installed.
"""

from __future__ import annotations

import json
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxslim_bn.app.cli import main
from onnxslim_bn.passes import openvino_int8
from onnxslim_bn.passes.openvino_int8 import FALLBACK_NOTE, settings_for_cpu
from onnxslim_bn.passes.verify import compare_output
from tests.fixtures import heldout, path

CALIBRATION = 96  # of the 192 samples passed: the first 96 calibrate, the other 96 check
SAMPLES = 192
NEEDS_NNCF = "nncf is not installed (pip install 'onnx-bnslim[nncf]'; it is in the test extra)"


def _ov():
    return pytest.importorskip("openvino", reason="OpenVINO is not installed (pip install 'onnx-bnslim[openvino]')")


def _calib(tmp_path) -> str:
    np.savez(tmp_path / "calib.npz", input=heldout()[0][:SAMPLES])
    return str(tmp_path / "calib.npz")


def _args(tmp_path, *extra: str) -> list[str]:
    return [str(path("resnet")), "--threshold", "1e-3", "--data", _calib(tmp_path), "--quantize", "int8",
            "--calibration-samples", str(CALIBRATION), "--compensation", "bias", "--no-probe",
            "-o", str(tmp_path / "m.int8.onnx"), "--openvino", str(tmp_path / "ir"),
            "--json", str(tmp_path / "r.json"), "-q", *extra]


@pytest.fixture(scope="module")
def nncf_run(tmp_path_factory):
    """One CLI run through NNCF, with nncf.quantize watched: what it calibrated on."""
    _ov()
    nncf = pytest.importorskip("nncf", reason=NEEDS_NNCF)
    tmp = tmp_path_factory.mktemp("nncf")
    real, seen = nncf.quantize, []

    def watched(model, dataset, **kwargs):
        seen.append(([item["input"] for item in dataset.get_data()], kwargs))
        return real(model, dataset, **kwargs)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(nncf, "quantize", watched)
        assert main(_args(tmp)) == 0
    return tmp, json.loads((tmp / "r.json").read_text()), seen


def test_nncf_ir_is_written_int8_with_the_interface_and_close_to_the_fp32_original(nncf_run):
    ov = _ov()
    tmp, doc, _ = nncf_run
    xml = tmp / "ir" / "m.int8.xml"
    assert sorted(p.name for p in (tmp / "ir").iterdir()) == ["m.int8.bin", "m.int8.xml"]  # no temporary left
    text = xml.read_text()
    assert 'type="FakeQuantize"' in text and 'element_type="i8"' in text  # quantized activations, INT8 weights
    core = ov.Core()
    ir, original = core.read_model(str(xml)), ov.convert_model(str(path("resnet")))
    for a, b in ((ir.inputs, original.inputs), (ir.outputs, original.outputs)):  # the original's interface
        assert [(p.get_any_name(), p.get_element_type(), p.get_partial_shape()) for p in a] == \
               [(p.get_any_name(), p.get_element_type(), p.get_partial_shape()) for p in b]
    x = heldout()[0][CALIBRATION:SAMPLES]  # the check's samples
    compiled = core.compile_model(ir, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled.create_infer_request().infer({"input": x})[compiled.outputs[0]]
    want = ort.InferenceSession(str(path("resnet")), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    found = compare_output("logits", want, got, len(x), 1)
    ov_doc = doc["openvino"]
    assert ov_doc["route"] == "nncf" and ov_doc["compared_with"] == "the FP32 original"
    check = ov_doc["check"]
    assert check["samples"] == len(x)
    # the report holds what the IR does (OpenVINO's FP32 precision: the same numbers run to run)
    assert check["cosine"] == pytest.approx(found.cosine, abs=1e-6)
    assert check["max_rel_diff"] == pytest.approx(found.max_rel_diff, rel=1e-4)
    assert check["top1_agreement"] == pytest.approx(found.top1_agreement, abs=1e-9)
    # the tolerance stated: within twice onnxruntime's INT8 error against the original, at least 2%
    ort_rel = doc["quantization"]["steps"]["total"]["max_rel_diff"]
    assert check["tolerance"] == pytest.approx(max(2 * ort_rel, 2e-2))
    assert 0 < found.max_rel_diff <= check["tolerance"]
    assert found.cosine > 0.998 and found.top1_agreement >= 0.97
    assert any(n.startswith("OpenVINO INT8 IR by NNCF") for n in doc["notes"])


def test_nncf_calibrates_on_the_calibration_share_only(nncf_run):
    _, doc, seen = nncf_run
    assert len(seen) == 1
    items, kwargs = seen[0]
    x = heldout()[0]
    assert len(items) == CALIBRATION and all(item.shape == (1, 3, 16, 16) for item in items)  # one sample a step
    np.testing.assert_array_equal(np.concatenate(items), x[:CALIBRATION])  # never a check sample
    assert kwargs["subset_size"] == CALIBRATION
    q = doc["openvino"]["quantizer"]
    assert q["calibration_samples"] == CALIBRATION and q["preset"] == str(kwargs["preset"]) == "performance"
    assert q["target_device"] == "CPU" and q["calibration"] == "MinMax"


def test_nncf_ir_refused_without_data(tmp_path, capsys):
    _ov()
    args = [str(path("resnet")), "--threshold", "1e-3", "--quantize", "int8", "-o", str(tmp_path / "m.onnx"),
            "--openvino", str(tmp_path / "ir")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "--data" in err and err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


def test_nncf_check_failure_writes_nothing(tmp_path, capsys, monkeypatch):
    """The IR's check against the original fails (its tolerance forced to 0): no IR, no model."""
    _ov()
    pytest.importorskip("nncf", reason=NEEDS_NNCF)
    monkeypatch.setattr(openvino_int8, "int8_tolerance", lambda rel, fp16: 0.0)
    assert main(_args(tmp_path)) == 1
    err = capsys.readouterr().err
    assert "fails the check against the FP32 original" in err and "--openvino-int8 qdq" in err
    assert err.count("\n") == 1
    assert not (tmp_path / "m.int8.onnx").exists() and list((tmp_path / "ir").iterdir()) == []


def test_without_nncf_the_qdq_route_with_a_note(tmp_path, monkeypatch):
    _ov()
    monkeypatch.setitem(sys.modules, "nncf", None)  # import nncf now raises ImportError
    assert main(_args(tmp_path)) == 0
    doc = json.loads((tmp_path / "r.json").read_text())
    assert doc["openvino"]["route"] == "qdq" and doc["openvino"]["compared_with"] == "onnxruntime, the same model"
    assert FALLBACK_NOTE in doc["notes"] and "pip install 'onnx-bnslim[nncf]'" in FALLBACK_NOTE
    assert 'type="FakeQuantize"' in (tmp_path / "ir" / "m.int8.xml").read_text()
    assert onnx.load(str(tmp_path / "m.int8.onnx")).graph.output[0].name == "logits"


def test_openvino_int8_flag_refusals_before_any_work(tmp_path, capsys, monkeypatch):
    _ov()
    vgg = str(path("vgg"))
    cases = [([vgg, "--ratio", "0.3", "--openvino", str(tmp_path / "ir"), "--openvino-int8", "nncf"],
              "add --openvino OUT_DIR and --quantize int8"),
             ([vgg, "--ratio", "0.3", "--openvino-int8", "qdq"], "add --openvino OUT_DIR and --quantize int8")]
    for args, message in cases:
        assert main([*args, "-o", str(tmp_path / "o.onnx")]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    monkeypatch.setitem(sys.modules, "nncf", None)
    assert main([*_args(tmp_path, "--openvino-int8", "nncf")]) == 1
    err = capsys.readouterr().err
    assert "needs NNCF" in err and "pip install 'onnx-bnslim[nncf]'" in err and err.count("\n") == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz"]


@pytest.mark.parametrize("cpuinfo, machine, fix, why", [
    ("flags : fpu sse avx2 avx512f avx512_vnni", "x86_64", "disable", "x86 with VNNI"),
    ("flags : fpu sse avx2 avx_vnni", "x86_64", "disable", "x86 with VNNI"),
    ("flags : fpu sse avx2 avx512f", "x86_64", "first_layer_only", "x86 without VNNI"),
    ("Features : fp asimd asimddp", "aarch64", "disable", "ARM"),
])
def test_settings_follow_the_cpu(cpuinfo, machine, fix, why):
    s = settings_for_cpu(cpuinfo, machine)
    assert s.preset == "performance" and s.target_device == "CPU" and s.overflow_fix == fix
    assert f"; {why}:" in s.reason


def test_nncf_ir_holds_the_runs_gates(tmp_path):
    """The run's gates apply to NNCF's IR as to the deployed model: a --min-cosine of 1 (which no
    INT8 model meets) refuses it, naming the gate; nothing is written."""
    _ov()
    pytest.importorskip("nncf", reason=NEEDS_NNCF)
    import onnxslim_bn
    from onnxslim_bn.app.api import to_openvino
    from onnxslim_bn.errors import BnSlimError

    result = onnxslim_bn.prune(str(path("resnet")), threshold=1e-3, data={"input": heldout()[0][:SAMPLES]},
                               calibration_samples=CALIBRATION, compensation="bias", quantize="int8", probe=False,
                               int8_fp32=0)
    result.report.options["min_cosine"] = 1.0  # set after the run: the onnxruntime check passed without it
    with pytest.raises(BnSlimError, match=r"fails the check against the FP32 original: .*--min-cosine 1"):
        to_openvino(result, tmp_path / "ir", "m", int8_route="nncf")
    assert list((tmp_path / "ir").iterdir()) == []


def test_nodes_onnxruntime_keeps_in_fp32_nncf_keeps_in_fp32_too():
    # quantize.sensitivity's FP32 nodes are ONNX names; OpenVINO's reader names a biased Conv's
    # op <name>/WithoutBiases. Those found are NNCF's ignored scope: their weights stay FP32.
    _ov()
    pytest.importorskip("nncf", reason=NEEDS_NNCF)
    model = onnx.load(str(path("resnet", "ts-folded")))
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    kept = [convs[0], convs[len(convs) // 2], "no-such-node"]
    quantized, settings = openvino_int8.quantize_ir(model, {"input": heldout()[0][:16]}, "resnet", fp32_nodes=kept)
    assert settings.fp32_nodes == kept and settings.fp32_nodes_found == kept[:2]

    def weight_is_quantized(op) -> bool:  # the weight path of an INT8 conv passes a FakeQuantize or a Convert
        source = op.input_value(1).get_node()
        while source.get_type_name() in ("Multiply", "Subtract", "Convert", "Reshape"):
            if source.get_type_name() == "Convert":
                return True
            source = source.input_value(0).get_node()
        return source.get_type_name() == "FakeQuantize"

    ops = {op.get_friendly_name(): op for op in quantized.get_ops()}
    others = [ops[f"{c}/WithoutBiases"] for c in convs if c not in kept and f"{c}/WithoutBiases" in ops]
    assert others and all(weight_is_quantized(op) for op in others)  # the check can see quantization
    assert not any(weight_is_quantized(ops[f"{c}/WithoutBiases"]) for c in kept[:2])

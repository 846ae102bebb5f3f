"""--quantize int8 (onnxslim_bn.passes.quantize): the deployed INT8 model, checked against the FP32 original."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import onnx
from onnx import numpy_helper
import onnxruntime as ort
import pytest

import onnxslim_bn
from onnxslim_bn.app.cli import main
from onnxslim_bn.errors import BnSlimError, CheckFailed
from onnxslim_bn.passes.quantize import NEEDS_DATA, quantize, settings_for_cpu
from onnxslim_bn.passes.verify import compare_output
from tests.fixtures import heldout, path
from tests.graphs import Builder

CALIBRATION = 96  # of the 192 samples the tests pass: the first 96 calibrate, the other 96 check
SAMPLES = 192


def _data() -> dict[str, np.ndarray]:
    return {"input": heldout()[0][:SAMPLES]}


def _run(model: onnx.ModelProto, x: np.ndarray, as_written: bool = False) -> np.ndarray:
    """onnxruntime's outputs; ``as_written``: graph optimizations off, as the check runs FP32 models
    (INT8 models it runs as deployed, optimized: the QDQ pairs fused into INT8 kernels)."""
    options = ort.SessionOptions()
    if as_written:
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    sess = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    return sess.run(None, {"input": x})[0]


@pytest.fixture(scope="module")
def quantized():
    return onnxslim_bn.prune(str(path("resnet")), threshold=1e-3, data=_data(), calibration_samples=CALIBRATION,
                             compensation="bias", quantize="int8", probe=False)


def _signature(values) -> list:
    return [(v.name, v.type.tensor_type.elem_type,
             [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]) for v in values]


def test_int8_model_runs_in_onnxruntime_with_the_original_interface(quantized):
    original = onnx.load(str(path("resnet")))
    model = quantized.model
    ops = {n.op_type for n in model.graph.node}
    assert {"QuantizeLinear", "DequantizeLinear"} <= ops
    weights = {t.name: t for t in model.graph.initializer}
    int8_conv_weights = [n for n in model.graph.node if n.op_type == "DequantizeLinear"
                         and n.input[0] in weights and weights[n.input[0]].data_type == onnx.TensorProto.INT8
                         and len(weights[n.input[1]].dims) == 1 and weights[n.input[1]].dims[0] > 1]
    assert int8_conv_weights, "weights are int8 with one scale per output channel"
    assert _signature(model.graph.input) == _signature(original.graph.input)  # incl. the dynamic 'batch'
    assert _signature(model.graph.output) == _signature(original.graph.output)
    assert [p.key for p in model.metadata_props] == [p.key for p in quantized.fp32_model.metadata_props]
    onnx.checker.check_model(model, full_check=True)
    x = heldout()[0][CALIBRATION:SAMPLES]
    for batch in (1, 7, len(x)):  # the dynamic batch stays dynamic
        got = _run(model, x[:batch])
        want = _run(original, x[:batch])
        assert got.shape == want.shape == (batch, 10) and got.dtype == np.float32
    cosine = compare_output("logits", _run(original, x), _run(model, x), len(x), 1).cosine
    assert cosine > 0.999


def test_the_check_reports_both_steps_as_onnxruntime_measures_them(quantized):
    x = heldout()[0][CALIBRATION:SAMPLES]  # the check share
    original = _run(onnx.load(str(path("resnet"))), x, as_written=True)
    slim = _run(quantized.fp32_model, x, as_written=True)
    deployed = _run(quantized.model, x)
    steps = quantized.report.quantization["steps"]
    for key, (a, b) in {"pruning": (original, slim), "quantization": (slim, deployed),
                        "total": (original, deployed)}.items():
        want = compare_output("logits", a, b, len(x), 1)
        got = steps[key]
        assert got["samples"] == len(x) == 96
        assert got["top1_agreement"] == pytest.approx(want.top1_agreement, abs=1e-12), key
        assert got["cosine"] == pytest.approx(want.cosine, rel=1e-12), key
        assert got["max_rel_diff"] == pytest.approx(want.max_rel_diff, rel=1e-12), key
    # the gated check is the deployed model against the FP32 original
    v = quantized.report.verification
    assert v.cosine == pytest.approx(steps["total"]["cosine"], rel=1e-12)
    assert v.disjoint and not v.random and v.calibration_samples == CALIBRATION
    assert steps["quantization"]["max_rel_diff"] > 0  # INT8 is not the FP32 model
    doc = quantized.report.to_dict()
    assert doc["quantization"]["steps"]["total"]["cosine"] == steps["total"]["cosine"]
    assert doc["quantization"]["settings"]["per_channel"] is True
    table = quantized.report.table()
    assert "original -> slim (FP32)" in table and "slim -> slim + INT8" in table


def test_calibration_uses_the_calibration_share_only(quantized):
    x = heldout()[0]
    check = x[CALIBRATION:SAMPLES]
    same = quantize(quantized.fp32_model, {"input": x[:CALIBRATION]}, "slim")
    np.testing.assert_array_equal(_run(same.model, check), _run(quantized.model, check))
    with_check = quantize(quantized.fp32_model, {"input": x[:SAMPLES]}, "slim")  # the check share would change it
    assert not np.array_equal(_run(with_check.model, check), _run(quantized.model, check))


def test_gates_apply_to_the_deployed_model(quantized):
    steps = quantized.report.quantization["steps"]
    assert steps["total"]["cosine"] < steps["pruning"]["cosine"]
    gate = (steps["total"]["cosine"] + steps["pruning"]["cosine"]) / 2  # the slim model passes it, INT8 does not
    common = dict(threshold=1e-3, data=_data(), calibration_samples=CALIBRATION, compensation="bias", probe=False,
                  min_cosine=gate)
    onnxslim_bn.prune(str(path("resnet")), **common)  # FP32 alone passes
    with pytest.raises(CheckFailed, match="pruned \\+ INT8.*--min-cosine") as failed:
        onnxslim_bn.prune(str(path("resnet")), quantize="int8", **common)
    assert failed.value.report.quantization["steps"]["pruning"]["cosine"] >= gate


def test_cli_gate_failure_writes_no_model_and_the_report_says_why(tmp_path, quantized):
    np.savez(tmp_path / "calib.npz", input=_data()["input"])
    out, report = tmp_path / "m.int8.onnx", tmp_path / "r.json"
    gate = quantized.report.quantization["steps"]["total"]["cosine"] + 1e-7
    code = main([str(path("resnet")), "--threshold", "1e-3", "--data", str(tmp_path / "calib.npz"), "--quantize", "int8",
                 "--calibration-samples", str(CALIBRATION), "--compensation", "bias", "--no-probe",
                 "--min-cosine", f"{gate:.9f}", "-o", str(out), "--json", str(report), "-q"])
    assert code == 1 and not out.exists()
    doc = json.loads(report.read_text())
    assert doc["verification"]["failed"] and doc["quantization"]["steps"]["total"]["cosine"] < gate


def test_cli_writes_the_int8_model_beside_the_input_by_default(tmp_path):
    src = tmp_path / "net.onnx"
    src.write_bytes(path("resnet").read_bytes())
    np.savez(tmp_path / "calib.npz", input=_data()["input"])
    code = main([str(src), "--ratio", "0.3", "--data", str(tmp_path / "calib.npz"), "--quantize", "int8",
                 "--compensation", "bias", "--no-probe", "-q"])
    assert code == 0
    written = onnx.load(str(tmp_path / "net.slim.int8.onnx"))
    assert any(n.op_type == "QuantizeLinear" for n in written.graph.node)
    assert not (tmp_path / "net.slim.onnx").exists()


def test_refused_without_data_in_one_line_before_any_work(tmp_path, capsys):
    src = tmp_path / "net.onnx"
    src.write_bytes(path("resnet").read_bytes())
    before = hashlib.sha256(src.read_bytes()).hexdigest()
    code = main([str(src), "--ratio", "0.3", "--quantize", "int8"])
    err = capsys.readouterr().err
    assert code == 1 and err.count("\n") == 1 and "--quantize int8" in err and "pass --data" in err
    assert list(tmp_path.iterdir()) == [src] and hashlib.sha256(src.read_bytes()).hexdigest() == before
    with pytest.raises(BnSlimError, match="calibrates each activation"):
        onnxslim_bn.prune(str(src), ratio=0.3, quantize="int8")
    with pytest.raises(BnSlimError, match="choose int8"):
        onnxslim_bn.prune(str(src), ratio=0.3, quantize="int4", data=_data())
    assert "real inputs" in NEEDS_DATA


def test_refused_when_calibration_and_check_cannot_be_kept_apart():
    few = {"input": heldout()[0][:40]}  # under 64 samples: the default split would share them
    with pytest.raises(BnSlimError, match="--calibration-samples"):
        onnxslim_bn.prune(str(path("resnet")), ratio=0.3, data=few, compensation="bias", importance="gamma",
                          quantize="int8", probe=False)
    result = onnxslim_bn.prune(str(path("resnet")), ratio=0.3, data=few, calibration_samples=20, compensation="bias",
                               importance="gamma", quantize="int8", probe=False)
    assert result.report.quantization["calibration_samples"] == 20
    assert result.report.quantization["steps"]["total"]["samples"] == 20


def test_fixed_batch_model_calibrates_in_whole_batches():
    b = Builder(seed=3)
    dead = np.array([1, 4, 6])
    y = b.op("Relu", [b.bn(b.conv("input", 3, 8), 8, dead=dead)])
    y = b.op("Relu", [b.bn(b.conv(y, 8, 16), 16)])
    y = b.op("GlobalAveragePool", [y])
    y = b.op("Flatten", [y])
    out = b.gemm(y, 16, 5)
    model = b.model({"input": [4, 3, 8, 8]}, [out])
    x = np.random.default_rng(0).standard_normal((90, 3, 8, 8)).astype(np.float32)  # not whole batches of 4
    result = onnxslim_bn.prune(model, threshold=1e-3, round_to=1, data={"input": x}, compensation="bias",
                               quantize="int8", probe=False, allow_growth=True)  # 7 KB: QDQ pairs outweigh INT8
    assert _signature(result.model.graph.input) == _signature(model.graph.input)
    assert result.report.quantization["calibration_samples"] == 45
    assert result.report.verification.samples == 45 and result.report.verification.cosine > 0.995
    assert result.report.removed_channels >= 3


@pytest.mark.parametrize("cpuinfo, machine, activations, reduce_range", [
    ("flags\t: fpu avx2 avx512f avx512_vnni", "x86_64", "uint8", False),
    ("flags\t: fpu avx2 avx_vnni", "x86_64", "uint8", False),
    ("flags\t: fpu sse4_2 avx2", "x86_64", "uint8", True),
    ("Features\t: fp asimd asimddp", "aarch64", "int8", False),
])
def test_activation_type_suits_the_cpu(cpuinfo, machine, activations, reduce_range):
    s = settings_for_cpu(cpuinfo, machine)
    assert (s.activations, s.reduce_range, s.weights, s.per_channel) == (activations, reduce_range, "int8", True)
    assert s.reason


# ---------------------------------------------------------------- bench --quantize int8: the four-way table


def test_bench_four_way_times_the_four_models_and_quantizes_both(tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input=_data()["input"])
    slim = tmp_path / "slim.onnx"
    assert main([str(path("resnet")), "--threshold", "1e-3", "--compensation", "bias", "--no-probe", "-o", str(slim),
                 "-q"]) == 0
    report = tmp_path / "bench.json"
    code = main(["bench", str(path("resnet")), str(slim), "--quantize", "int8", "--data", str(tmp_path / "calib.npz"),
                 "--batch", "1,3", "--runs", "4", "--warmup", "0", "--runtimes", "onnxruntime", "--json", str(report)])
    out = capsys.readouterr().out
    assert code == 0
    assert all(h in out for h in ("FP32 ms", "Slim ms", "INT8 ms", "Slim + INT8 ms", "Slim ideal (MACs)"))
    doc = json.loads(report.read_text())
    assert doc["kind"] == "bench" and [(r["runtime"], r["batch"]) for r in doc["rows"]] == [("onnxruntime", 1),
                                                                                          ("onnxruntime", 3)]
    assert "96 samples" in doc["notes"][0]  # the calibration share: the first half of 192, as prune takes it
    for row in doc["rows"]:
        assert set(row["times"]) == {"fp32", "slim", "int8", "slim_int8"}
        assert all(t["median_ms"] > 0 for t in row["times"].values())
        assert row["pruning_gain_in_int8"] == pytest.approx(row["times"]["int8"]["median_ms"]
                                                            / row["times"]["slim_int8"]["median_ms"])
    from onnxslim_bn.app.bench import _mac_ratio

    ideal = _mac_ratio([onnx.load(str(path("resnet"))), onnx.load(str(slim))], {}, "resnet")
    assert doc["rows"][0]["ideal"] == pytest.approx(ideal) and ideal > 1.2


def test_bench_four_way_refusals(tmp_path, capsys):
    np.savez(tmp_path / "calib.npz", input=_data()["input"])
    int8_file = tmp_path / "int8.onnx"
    assert main([str(path("resnet")), "--threshold", "1e-3", "--compensation", "bias", "--no-probe", "--quantize",
                 "int8", "--data", str(tmp_path / "calib.npz"), "-o", str(int8_file), "-q"]) == 0
    capsys.readouterr()
    # (bench --data alone times the pair on those samples: tests/test_data_entry.py)
    cases = [(["--quantize", "int8"], "pass --data")]
    for extra, message in cases:
        assert main(["bench", str(path("resnet")), str(path("resnet")), *extra, "--runs", "1"]) == 1
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1
    assert main(["bench", str(path("resnet")), str(int8_file), "--quantize", "int8", "--data",
                 str(tmp_path / "calib.npz"), "--runs", "1"]) == 1
    err = capsys.readouterr().err
    assert "already quantized" in err and str(int8_file) in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["calib.npz", "int8.onnx"]


def test_openvino_ir_of_the_int8_model_is_int8_and_checked(tmp_path):
    """The QDQ route (OpenVINO reads the onnxruntime INT8 model; NNCF's route: tests/test_nncf.py)."""
    ov = pytest.importorskip("openvino")
    np.savez(tmp_path / "calib.npz", input=_data()["input"])
    out, ir = tmp_path / "m.int8.onnx", tmp_path / "ir"
    assert main([str(path("resnet")), "--threshold", "1e-3", "--data", str(tmp_path / "calib.npz"), "--quantize", "int8",
                 "--calibration-samples", str(CALIBRATION), "--compensation", "bias", "--no-probe", "-o", str(out),
                 "--openvino", str(ir), "--openvino-int8", "qdq", "--json", str(tmp_path / "r.json"), "-q"]) == 0
    xml = (ir / "m.int8.xml").read_text()
    assert 'type="FakeQuantize"' in xml and 'element_type="i8"' in xml  # INT8 weights, quantized activations
    doc = json.loads((tmp_path / "r.json").read_text())
    x = heldout()[0][CALIBRATION:SAMPLES]
    compiled = ov.Core().compile_model(str(ir / "m.int8.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    got = compiled.create_infer_request().infer({"input": x})[compiled.outputs[0]]
    ort_int8 = _run(onnx.load(str(out)), x)
    diff = float(np.max(np.abs(got - ort_int8)))
    assert doc["openvino"]["max_abs_diff"] == pytest.approx(diff, rel=1e-5)
    allowed = 2 * doc["quantization"]["steps"]["quantization"]["max_rel_diff"] * float(np.max(np.abs(ort_int8)))
    assert 0 < diff <= max(allowed, 1e-2 * float(np.max(np.abs(ort_int8))))
    original = _run(onnx.load(str(path("resnet"))), x, as_written=True)
    assert compare_output("logits", original, got, len(x), 1).cosine > 0.998


def test_int8_probe_keeps_the_blamed_layers_whole_and_writes_the_faster(monkeypatch):
    """The INT8 pair's probe acts on its finding: the layers onnxruntime's fused INT8 kernels
    ('<layer>_token_<n>') blame are kept whole in a second run, and the faster model is written.
    Timings are faked here (tests never assert a time): the decision is what is tested."""
    import onnxslim_bn.app.api as api
    from onnxslim_bn.app.bench import Blame, ProbeResult

    layer = "/layers/layers.1/conv1/Conv"  # a layer the first cut prunes (24 -> 16; widths round up since issue 16)
    calls = []

    def fake_probe(original, pruned, feeds, threads=None, **_):
        calls.append(pruned)
        if any(n.op_type == "QuantizeLinear" for n in original.graph.node) and len(calls) == 2:  # first INT8 pair
            return ProbeResult(1.0, 1.5, 10, [Blame(f"{layer}_token_3", "QLinearConv", 0.1, 0.4)])
        return ProbeResult(1.0, 0.8, 10)

    monkeypatch.setattr(api, "probe", fake_probe)
    result = onnxslim_bn.prune(str(path("resnet")), threshold=1e-3, data=_data(), calibration_samples=CALIBRATION,
                               compensation="bias", quantize="int8", probe=True)
    retry = result.report.quantization["probe_retry"]
    assert retry["kept_whole"] == [layer] and retry["chose"] == "second"
    assert layer in result.report.options["protected_layers"]  # the written model is the second run's
    assert result.report.quantization["probe"]["speedup"] == pytest.approx(1.25)
    assert any("wrote that one" in n for n in result.report.notes)
    first_kept = {tuple(s.producers): s.kept for s in onnxslim_bn.prune(str(path("resnet")), threshold=1e-3, data=_data(),
                                                           calibration_samples=CALIBRATION, compensation="bias",
                                                           probe=False).report.spaces}
    assert {tuple(s.producers): s.kept for s in result.report.spaces} != first_kept  # the kept layer changed the cut


def test_sweep_quantizes_every_budget_and_says_so():
    from onnxslim_bn.app.sweep import sweep
    from onnxslim_bn.options import PruneOptions

    common = dict(data=_data(), calibration_samples=CALIBRATION, compensation="bias")
    fp32 = sweep(str(path("resnet")), PruneOptions(**common), "threshold", [1e-3])
    int8 = sweep(str(path("resnet")), PruneOptions(quantize="int8", **common), "threshold", [1e-3])
    assert "INT8" in int8.table() and "INT8" not in fp32.table()
    one = onnxslim_bn.prune(str(path("resnet")), threshold=1e-3, quantize="int8", **common)
    assert int8.points[0].cosine == pytest.approx(one.report.verification.cosine, rel=1e-12)
    assert int8.points[0].cosine < fp32.points[0].cosine
    assert int8.points[0].macs == fp32.points[0].macs


def test_nodes_whose_quantization_dominates_the_error_stay_fp32():
    """densenet (pre-activation BN after each Concat): one BN's quantized input carries about half
    the INT8 error. The search runs on calibration samples only; the check share confirms it."""
    common = dict(threshold=1e-3, data={"input": heldout()[0][:400]}, calibration_samples=CALIBRATION,
                  compensation="bias", quantize="int8", probe=False)
    plain = onnxslim_bn.prune(str(path("densenet")), int8_fp32=0, **common)
    kept = onnxslim_bn.prune(str(path("densenet")), **common)
    q = kept.report.quantization
    found = q["sensitivity"]
    assert plain.report.quantization["sensitivity"] is None and plain.report.quantization["excluded_nodes"] == []
    assert found["chosen"] and q["excluded_nodes"] == found["chosen"] and found["samples"] == 64
    assert found["error_after"] < 0.8 * found["error"]  # each kept node removed at least a fifth of the error
    assert found["most_sensitive"][0]["node"] == found["chosen"][0]
    # the kept node reads float: no DequantizeLinear feeds it any more
    producer = {o: n for n in kept.model.graph.node for o in n.output}
    node = next(n for n in kept.model.graph.node if n.name == found["chosen"][0])
    assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in node.input)
    x = heldout()[0][CALIBRATION:400]  # the check share: 304 samples the search never saw
    slim = _run(kept.fp32_model, x, as_written=True)  # what the search measures against: the FP32 slim model
    np.testing.assert_array_equal(slim, _run(plain.fp32_model, x, as_written=True))
    better, worse = _run(kept.model, x), _run(plain.model, x)
    l2 = [float(np.linalg.norm(o - slim) / np.linalg.norm(slim)) for o in (better, worse)]
    assert l2[0] < 0.85 * l2[1]
    assert q["steps"]["quantization"]["cosine"] == pytest.approx(compare_output("logits", slim, better, len(x), 1).cosine,
                                                                 rel=1e-12)
    assert q["steps"]["quantization"]["cosine"] > plain.report.quantization["steps"]["quantization"]["cosine"]
    for bad in ("some", "-1"):
        with pytest.raises(BnSlimError, match="--int8-fp32"):
            onnxslim_bn.prune(str(path("densenet")), **{**common, "int8_fp32": bad})


def test_named_fp32_nodes_are_kept_without_a_search():
    from onnxslim_bn.passes.quantize import quantize_with_fallback

    model = onnx.load(str(path("densenet")))
    node = "/features/features.2/body/body.0/BatchNormalization"
    q, found = quantize_with_fallback(model, {"input": heldout()[0][:64]}, "densenet", None, [node, "/no/such/node"])
    assert found is None and q.excluded == [node]
    producer = {o: n for n in q.model.graph.node for o in n.output}
    target = next(n for n in q.model.graph.node if n.name == node)
    assert all(producer.get(i) is None or producer[i].op_type != "DequantizeLinear" for i in target.input)
    onnx.checker.check_model(q.model, full_check=True)
    read = {i for n in q.model.graph.node for i in n.input}
    assert all(t.name in read for t in q.model.graph.initializer)  # nothing left dangling
    assert all(any(o in read or o in {x.name for x in q.model.graph.output} for o in n.output)
               for n in q.model.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear"))


def _tiny_chain() -> onnx.ModelProto:
    """conv3x3 -> BN (one dead channel) -> ReLU, four 1x1 conv-BN-ReLU, a 1x1 head: 16 wide, 9 KB."""
    b = Builder(seed=3)
    x = b.op("Relu", [b.bn(b.conv("x", 3, 16, k=3), 16, dead=np.array([0]), beta_dead=None)])
    for _ in range(4):
        x = b.op("Relu", [b.bn(b.conv(x, 16, 16, k=1, pad=0), 16)])
    return b.model({"x": [None, 3, 8, 8]}, [b.conv(x, 16, 4, k=1, pad=0)])


def test_with_quantize_the_written_int8_file_is_held_to_the_input_size():
    """Never larger: with --quantize the INT8 file is what is written, so it is the one held to
    the input's size. On a 9 KB model the QDQ pairs outweigh what INT8 weights save: refused in
    one line, unless --allow-growth."""
    model = _tiny_chain()
    data = {"x": np.random.default_rng(1).standard_normal((128, 3, 8, 8)).astype(np.float32)}
    with pytest.raises(BnSlimError, match=r"the INT8 model \(\d+ bytes\) would exceed the input's"):
        onnxslim_bn.prune(model, threshold=1e-3, round_to=1, data=data, quantize="int8")
    grown = onnxslim_bn.prune(model, threshold=1e-3, round_to=1, data=data, quantize="int8", allow_growth=True)
    assert grown.model.ByteSize() > model.ByteSize()


def test_with_quantize_the_fp32_intermediate_is_not_held_to_the_input_size(monkeypatch):
    """The FP32 pruned model is not written with --quantize: the file-size rule that refuses a
    grown FP32 model (here made to refuse every one) does not apply to it."""
    def refuse(*args, **kwargs):
        raise BnSlimError("the FP32 model was held to the input's size")

    monkeypatch.setattr("onnxslim_bn.app.pipeline.check_file_size", refuse)
    b = Builder(seed=3)
    x = b.op("Relu", [b.bn(b.conv("x", 3, 32, k=3), 32, dead=np.array([0]), beta_dead=None)])
    x = b.op("Relu", [b.bn(b.conv(x, 32, 32, k=3), 32)])
    model = b.model({"x": [None, 3, 8, 8]}, [b.conv(x, 32, 4, k=1, pad=0)])
    data = {"x": np.random.default_rng(1).standard_normal((128, 3, 8, 8)).astype(np.float32)}
    with pytest.raises(BnSlimError, match="held to the input's size"):
        onnxslim_bn.prune(model, threshold=1e-3, round_to=1, data=data)
    result = onnxslim_bn.prune(model, threshold=1e-3, round_to=1, data=data, quantize="int8")
    assert result.report.removed_channels == 1 and result.model.ByteSize() <= model.ByteSize()


def _quantization_hostile() -> onnx.ModelProto:
    """conv3x3 -> BN (two dead channels) -> ReLU -> conv3x3 -> GAP -> Gemm, 32 wide; channel 0 of
    the first conv's output is 1000x the others (and read 1000x weaker): per-tensor INT8 ranges
    leave the other channels a level or two, the FP32 model does not care."""
    b = Builder(seed=3)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 32), 32, dead=np.array([5, 9]))])
    conv = b.conv(y, 32, 32)
    model = b.model({"x": [None, 3, 8, 8]}, [b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [
        b.op("Relu", [conv])])]), 32, 10)])
    by_name = {t.name: t for t in model.graph.initializer}
    bn = next(n for n in model.graph.node if n.op_type == "BatchNormalization")
    second = [n for n in model.graph.node if n.op_type == "Conv"][1]
    gamma, beta = (numpy_helper.to_array(by_name[bn.input[i]]).copy() for i in (1, 2))
    gamma[0], beta[0] = gamma[0] * 1000, beta[0] * 1000
    w = numpy_helper.to_array(by_name[second.input[1]]).copy()
    w[:, 0] /= 1000
    for name, value in ((bn.input[1], gamma), (bn.input[2], beta), (second.input[1], w)):
        by_name[name].CopyFrom(numpy_helper.from_array(value.astype(np.float32), name))
    return model


def test_an_int8_collapse_is_blamed_on_the_quantization_and_not_retried_as_another_cut(caplog):
    """Pruning exact (two dead channels), INT8 far off: the loud line names the INT8 step, and a
    budget run would not try other cuts for it."""
    model = _quantization_hostile()
    data = {"x": np.random.default_rng(1).standard_normal((256, 3, 8, 8)).astype(np.float32)}
    result = onnxslim_bn.prune(model, threshold=1e-3, round_to=1, data=data, quantize="int8", int8_fp32=0,
                               allow_growth=True, probe=False)
    found = result.report.collapse
    steps = result.report.quantization["steps"]
    assert steps["pruning"]["cosine"] > 0.9999 and steps["quantization"]["cosine"] < 0.98, steps
    assert found is not None and found.step == "quantization"
    assert [a["what"] for a in found.attempts] == ["as asked"]  # no other cut tried: it would not mend INT8
    assert "the INT8 model collapsed" in found.message() and "pruning alone kept cosine 1.0000" in found.message()
    assert any("the INT8 model collapsed" in r.message for r in caplog.records)

"""OpenVINO handoff and the bench command: they work and their numbers are well-formed
(no test here asserts a time)."""

from __future__ import annotations

import json
import math

import numpy as np
import onnx
import pytest

from onnxslim_bn import prune, save_model, to_openvino
from onnxslim_bn.app.bench import benchmark
from onnxslim_bn.app.cli import main
from tests.fixtures import NAMES, heldout, path


@pytest.mark.parametrize("name", NAMES)
def test_ir_matches_onnxruntime(name, tmp_path):
    result = prune(str(path(name, "ts-folded")), ratio=0.5, data=str(path("heldout").with_suffix(".npz")))
    ir = to_openvino(result, tmp_path, name)
    assert ir.passed and ir.max_abs_diff <= 1e-4 * max(ir.max_abs_value, 1.0)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.bin", f"{name}.xml"]
    import openvino as ov

    compiled = ov.Core().compile_model(str(tmp_path / f"{name}.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    x = heldout()[0][:16]
    got = compiled.create_infer_request().infer({"input": x})[compiled.outputs[0]]
    import onnxruntime as ort

    want = ort.InferenceSession(result.model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0]
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_cli_openvino_fp16(tmp_path, capsys):
    out = tmp_path / "ir"
    assert main([str(path("mobilenetv2")), "--ratio", "0.5", "-o", str(tmp_path / "m.onnx"),
                 "--openvino", str(out), "--fp16", "--report", str(tmp_path / "r.json")]) == 0
    assert (out / "m.xml").is_file() and (out / "m.bin").is_file()
    report = json.loads((tmp_path / "r.json").read_text())
    assert report["openvino"]["fp16"] is True and report["openvino"]["passed"] is True
    assert "OpenVINO IR (FP16)" in capsys.readouterr().out


def test_fp16_without_openvino_is_a_clear_error(tmp_path, capsys):
    assert main([str(path("vgg")), "--ratio", "0.5", "-o", str(tmp_path / "v.onnx"), "--fp16"]) == 1
    assert "--openvino" in capsys.readouterr().err
    assert not (tmp_path / "v.onnx").exists()


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bench")
    pruned = folder / "pruned.onnx"
    save_model(prune(str(path("resnet")), ratio=0.5).model, pruned)
    return path("resnet"), pruned


def test_bench_rows_are_well_formed(pair):
    result = benchmark(*pair, batches=(1, 4), runs=3, warmup=1)
    assert [(r.runtime, r.batch) for r in result.rows] == [
        ("onnxruntime", 1), ("onnxruntime", 4), ("openvino", 1), ("openvino", 4)]
    original, pruned = onnx.load(str(pair[0])), onnx.load(str(pair[1]))
    assert len(original.graph.node) and len(pruned.graph.node)
    for row in result.rows:
        for t in (row.original, row.pruned):
            assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms and math.isfinite(t.median_ms)
        assert row.ideal > 1.5  # ratio 0.5 removes well over a third of the MACs
        assert row.speedup == pytest.approx(row.original.median_ms / row.pruned.median_ms)
        assert row.efficiency == pytest.approx(row.speedup / row.ideal)
    table = result.table()
    assert "Measured / ideal" in table and "openvino" in table


def test_bench_cli_json_and_fixed_batch_note(pair, tmp_path, capsys):
    out = tmp_path / "bench.json"
    assert main(["bench", str(pair[0]), str(pair[1]), "--batch", "2", "--runs", "2", "--warmup", "0",
                 "--runtimes", "onnxruntime", "--json", str(out), "--markdown"]) == 0
    data = json.loads(out.read_text())
    assert [r["batch"] for r in data["rows"]] == [2]
    assert "| onnxruntime | 2 |" in capsys.readouterr().out


def test_latency_table_in_both_runtimes():
    """Every kind of layer is found in each runtime's profile (conv, depthwise conv, Gemm)."""
    from onnxslim_bn.ir.shapes import infer_shapes
    from onnxslim_bn.passes.latency import TableStats, layer_latency_table
    from tests.graphs import Builder

    b = Builder(3)
    y = b.op("Relu", [b.conv("x", 3, 32, bias=True)])
    y = b.conv(y, 32, 32, group=32)  # depthwise
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    model = b.model({"x": ["N", 3, 8, 8]}, [b.gemm(y, 32, 10)])
    shapes = infer_shapes(model, {"x": [1, 3, 8, 8]}, "tiny")
    layers = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    for runtime in ("onnxruntime", "openvino"):
        stats = TableStats()
        curves = layer_latency_table(model, shapes, runtime=runtime, batch=2, threads=1, cache=False, block=16,
                                     stats=stats)
        assert list(curves) == layers and stats.timed == 3
        conv, depthwise, gemm = (curves[n] for n in layers)
        assert conv.c_in == [3] and conv.c_out == [16, 32] and not conv.tied
        assert depthwise.tied and depthwise.c_out == [16, 32]
        assert gemm.c_in == [16, 32] and gemm.c_out == [10]
        for curve in curves.values():
            assert all(ms > 0 for row in curve.ms for ms in row)
            assert curve.off_block_out > 0 and curve.off_block_in > 0


def test_the_openvino_hand_off_sends_no_telemetry():
    # ovc's telemetry is on when no consent file exists (it declines only in CI): importing
    # openvino and converting must both decline it, and leave the environment as they found it.
    # A fresh interpreter: telemetry starts once per process, at the first import of openvino.
    script = """
import os, onnx
os.environ.pop("CI", None)
from openvino_telemetry.utils.opt_in_checker import OptInChecker
seen, check = [], OptInChecker.check
OptInChecker.check = lambda self, *a, **k: seen.append(check(self, *a, **k)) or seen[-1]
from onnxslim_bn.ir.openvino_ir import convert
convert(onnx.load(%r))
print(len(seen), sum(r.name == "DECLINED" for r in seen), "CI" in os.environ)
""" % str(path("vgg"))
    import subprocess
    import sys
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300, check=True)
    seen, declined, ci = done.stdout.split()
    assert int(seen) >= 2 and declined == seen and ci == "False", done.stdout

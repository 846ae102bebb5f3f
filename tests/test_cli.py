"""The command line: the happy path, and bad input handled as one clear line."""

from __future__ import annotations

import hashlib
import json
import re
import shutil

import numpy as np
import onnx
import pytest

from onnxslim_bn.app.cli import main
from tests.fixtures import path
from tests.graphs import Builder


@pytest.fixture
def vgg(tmp_path):
    target = tmp_path / "vgg.onnx"
    shutil.copy(path("vgg"), target)
    return target


def digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def test_prune_writes_model_table_and_json_report(vgg, capsys):
    report = vgg.with_name("report.json")
    # --no-probe: the probe may replace a cut it times as slower (issue 16); the counts below are exact
    assert main([str(vgg), "--ratio", "0.1", "--round-to", "1", "--no-probe", "--report", str(report), "-v"]) == 0
    out = capsys.readouterr().out
    slim = vgg.with_name("vgg.slim.onnx")
    assert slim.is_file()
    onnx.checker.check_model(str(slim), full_check=True)
    for row in ("Conv/Gemm channels", "Parameters", "MACs", "Model size", "max |diff|", "cosine"):
        assert row in out
    data = json.loads(report.read_text())
    assert data["after"]["macs"] < data["before"]["macs"]
    assert data["after"]["size_bytes"] == slim.stat().st_size
    assert data["verification"]["cosine"] > 0.99
    assert data["removed_channels"] == int(0.1 * data["prunable_channels"])


def test_inspect_lists_spaces_and_reasons(vgg, capsys):
    assert main(["inspect", str(vgg), "--ratio", "0.5"]) == 0
    out = capsys.readouterr().out
    assert "Coverage:" in out and "graph output" in out and "bn" in out
    assert main(["inspect", str(vgg), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["coverage"]["prunable_fraction"] > 0.9


def test_max_error_gate_fails_and_writes_nothing(vgg, capsys):
    assert main([str(vgg), "--ratio", "0.9", "--max-error", "1e-9"]) == 1
    err = capsys.readouterr().err
    assert "exceeds --max-error" in err and len(err.strip().splitlines()) == 1
    assert not vgg.with_name("vgg.slim.onnx").exists()


def test_data_file_feeds_the_check(vgg, tmp_path, capsys):
    data = tmp_path / "inputs.npz"
    np.savez(data, input=np.random.default_rng(0).standard_normal((4, 3, 16, 16)).astype(np.float32))
    assert main([str(vgg), "--ratio", "0.2", "--data", str(data)]) == 0
    assert "inputs.npz" in capsys.readouterr().out


def no_bn_model():
    b = Builder()
    return b.model({"x": [1, 3, 5, 5]}, [b.conv(b.op("Relu", [b.conv("x", 3, 4)]), 4, 2)])


BAD = {
    "empty": (lambda p: p.write_bytes(b""), [], "empty"),
    "truncated": (lambda p: p.write_bytes(path("vgg").read_bytes()[:5000]), [], "not a readable ONNX model"),
    "not-onnx": (lambda p: p.write_text("hello, I am a text file\n" * 50), [], "ONNX"),
    "no-bn": (lambda p: p.write_bytes(no_bn_model().SerializeToString()), [], "do_constant_folding=False"),
    "ratio-zero": (lambda p: shutil.copy(path("vgg"), p), ["--ratio", "0"], "outside (0, 1)"),
    "ratio-one": (lambda p: shutil.copy(path("vgg"), p), ["--ratio", "1.5"], "outside (0, 1)"),
    "output-is-input": (lambda p: shutil.copy(path("vgg"), p), ["-o", "{model}"], "overwrite the input"),
    "output-folder-missing": (lambda p: shutil.copy(path("vgg"), p), ["-o", "{dir}/nope/out.onnx"], "does not exist"),
    "output-under-a-file": (lambda p: shutil.copy(path("vgg"), p), ["-o", "{model}/out.onnx"], "does not exist"),
    "report-folder-missing": (lambda p: shutil.copy(path("vgg"), p), ["--report", "{dir}/nope/r.json"], "does not exist"),
    "bad-input-shapes": (lambda p: shutil.copy(path("vgg"), p), ["--input-shapes", "input:1,x"], "NAME:D0,D1"),
    "unknown-input": (lambda p: shutil.copy(path("vgg"), p), ["--input-shapes", "img:1,3,16,16"], "model's inputs"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_line_nonzero_no_output_input_untouched(case, tmp_path, capsys):
    write, extra, message = BAD[case]
    model = tmp_path / "model.onnx"
    write(model)
    before = digest(model)
    args = [a.format(model=model, dir=tmp_path) for a in extra]
    if "--ratio" not in args:
        args += ["--ratio", "0.5"]
    assert main([str(model), *args]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    assert message in err and "Traceback" not in err
    assert digest(model) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_missing_file_is_one_line(tmp_path, capsys):
    assert main([str(tmp_path / "absent.onnx"), "--ratio", "0.5"]) == 1
    assert "no such file" in capsys.readouterr().err


def test_external_data_models_load_prune_and_save(tmp_path, monkeypatch, capsys):
    # the dynamo exporter writes external data even for small models; models over 2 GB must use it
    model = onnx.load(str(path("resnet")))
    source = tmp_path / "ext.onnx"
    onnx.save_model(model, str(source), save_as_external_data=True, location="ext.onnx.data", size_threshold=0)
    assert (tmp_path / "ext.onnx.data").is_file()
    from onnxslim_bn.ir import model_io

    monkeypatch.setattr(model_io, "PROTO_LIMIT", 1000)  # treat every model as over the protobuf limit
    out = tmp_path / "out.onnx"
    assert main([str(source), "--ratio", "0.3", "-o", str(out), "--openvino", str(tmp_path / "ir")]) == 0
    assert "max |diff|" in capsys.readouterr().out
    assert (tmp_path / "out.onnx.data").is_file()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ext.onnx", "ext.onnx.data", "ir", "out.onnx", "out.onnx.data"]
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((2, 3, 16, 16)).astype(np.float32)
    assert ort.InferenceSession(str(out), providers=["CPUExecutionProvider"]).run(None, {"input": x})[0].shape == (2, 10)


def test_fixed_batch_model_checks_many_samples_in_batches(tmp_path, capsys):
    # calibration (folded BN) and the check feed a batch-1 model 1000 held-out samples, one at a time
    model = onnx.load(str(path("vgg", "ts-folded")))
    for value in list(model.graph.input) + list(model.graph.output):
        value.type.tensor_type.shape.dim[0].Clear()
        value.type.tensor_type.shape.dim[0].dim_value = 1
    source = tmp_path / "b1.onnx"
    onnx.save(model, str(source))
    data = str(path("heldout").with_suffix(".npz"))
    assert main([str(source), "--ratio", "0.15", "--data", data, "-o", str(tmp_path / "out.onnx")]) == 0
    # the check's inputs are held-out samples the calibration did not use: hundreds, through a batch-1 model
    assert re.search(r"\b\d{3,} samples of heldout\.npz", capsys.readouterr().out)

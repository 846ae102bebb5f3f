"""Files stay safe: outputs never land on what the run reads or on each other; devices, pipes and
symlinks are written through (never replaced); bad paths and bad external data are one line."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import stat
import threading
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim_bn.app.cli import main
from onnxslim_bn.ir import model_io
from tests.graphs import Builder


def small_model() -> onnx.ModelProto:
    b = Builder()
    a = b.op("Relu", [b.bn(b.conv("x", 3, 16), 16, np.array([1, 4, 6, 9]), None)])
    return b.model({"x": [1, 3, 8, 8]}, [b.conv(a, 16, 4, k=1)])


@pytest.fixture
def model(tmp_path) -> Path:
    path = tmp_path / "model.onnx"
    onnx.save(small_model(), str(path))
    return path


@pytest.fixture
def external(tmp_path) -> Path:
    """model.onnx with its weights in model.onnx.data, as the dynamo exporter writes."""
    path = tmp_path / "model.onnx"
    onnx.save_model(small_model(), str(path), save_as_external_data=True, location="model.onnx.data", size_threshold=0)
    return path


def snapshot(folder: Path) -> dict[str, str]:
    """Every entry of the folder: its kind, link target or content digest."""
    out = {}
    for p in sorted(folder.iterdir()):
        mode = os.lstat(p).st_mode
        if stat.S_ISLNK(mode):
            out[p.name] = "link:" + os.readlink(p)
        elif stat.S_ISREG(mode):
            out[p.name] = hashlib.sha256(p.read_bytes()).hexdigest()
        else:
            out[p.name] = f"mode:{stat.S_IFMT(mode)}"
    return out


def refused(args: list[str], folder: Path, capsys, message: str) -> None:
    before = snapshot(folder)
    assert main(args) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert message in err, err
    assert snapshot(folder) == before  # nothing written, nothing replaced


# ---------------------------------------------------------------- devices, pipes, symlinks


def test_fifo_and_symlinks_are_written_through_and_survive(model, tmp_path, capsys):
    fifo = tmp_path / "report.fifo"
    os.mkfifo(fifo)
    received: list[bytes] = []
    reader = threading.Thread(target=lambda: received.append(fifo.read_bytes()), daemon=True)
    reader.start()
    target = tmp_path / "real" / "pruned.onnx"
    target.parent.mkdir()
    target.write_bytes(b"an older file")
    link = tmp_path / "link.onnx"
    link.symlink_to(target)
    widths_target = tmp_path / "real" / "widths.json"
    widths_link = tmp_path / "widths.json"
    widths_link.symlink_to(widths_target)  # dangling: written through to its target
    try:
        code = main([str(model), "--ratio", "0.2", "--round-to", "1", "-o", str(link), "--json", str(fifo),
                     "--export-widths", str(widths_link)])
    finally:
        if reader.is_alive():  # unblock the reader if nothing opened the pipe
            with open(fifo, "wb"):
                pass
        reader.join(10)
    assert code == 0, capsys.readouterr().err
    assert stat.S_ISFIFO(os.lstat(fifo).st_mode)
    report = json.loads(received[0])
    assert report["after"]["macs"] < report["before"]["macs"]
    assert link.is_symlink() and os.readlink(link) == str(target)
    assert widths_link.is_symlink() and os.readlink(widths_link) == str(widths_target)
    onnx.checker.check_model(str(target), full_check=True)
    assert json.loads(widths_target.read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link.onnx", "model.onnx", "real", "report.fifo", "widths.json"]


def test_dev_null_is_written_through(model, tmp_path, capsys):
    if not os.access("/dev/null", os.W_OK):
        pytest.skip("/dev/null is not writable here")
    before = os.stat("/dev/null")
    assert main([str(model), "--ratio", "0.2", "-o", "/dev/null", "--json", "/dev/null"]) == 0, capsys.readouterr().err
    after = os.stat("/dev/null")
    assert stat.S_ISCHR(after.st_mode) and (after.st_ino, after.st_rdev) == (before.st_ino, before.st_rdev)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.onnx"]


def test_save_and_write_through_a_symlink_replace_the_target_only(tmp_path):
    target = tmp_path / "target.json"
    target.write_text("old")
    link = tmp_path / "link.json"
    link.symlink_to(target.name)  # relative link
    model_io.write_text(link, "new\n")
    assert link.is_symlink() and os.readlink(link) == "target.json" and target.read_text() == "new\n"
    model_link = tmp_path / "m.onnx"
    model_link.symlink_to(tmp_path / "m_real.onnx")
    size = model_io.save_model(small_model(), model_link)
    assert model_link.is_symlink() and size == (tmp_path / "m_real.onnx").stat().st_size
    onnx.checker.check_model(str(model_link), full_check=True)


# ---------------------------------------------------------------- refused with one line, nothing touched


def test_output_naming_a_folder_is_refused(model, tmp_path, capsys):
    (tmp_path / "out").mkdir()
    refused([str(model), "--ratio", "0.2", "-o", str(tmp_path / "out")], tmp_path, capsys, "is a folder")
    refused([str(model), "--ratio", "0.2", "--json", str(tmp_path / "out")], tmp_path, capsys, "is a folder")


def test_report_on_the_model_or_on_the_output_is_refused(model, tmp_path, capsys):
    out = tmp_path / "out.onnx"
    refused([str(model), "--ratio", "0.2", "--json", str(model)], tmp_path, capsys, "would overwrite the input model")
    refused([str(model), "--ratio", "0.2", "-o", str(out), "--json", str(out)], tmp_path, capsys, "is the same file as -o")
    link = tmp_path / "alias.json"
    link.symlink_to(model)
    refused([str(model), "--ratio", "0.2", "--json", str(link)], tmp_path, capsys, "would overwrite the input model")
    os.link(model, tmp_path / "hard.onnx")
    refused([str(model), "--ratio", "0.2", "-o", str(tmp_path / "hard.onnx")], tmp_path, capsys,
            "would overwrite the input model")


def test_output_on_the_inputs_external_data_is_refused(external, tmp_path, capsys):
    data = tmp_path / "model.onnx.data"
    assert data.is_file()
    refused([str(external), "--ratio", "0.2", "-o", str(data)], tmp_path, capsys, "would overwrite the input's external data")
    # and -o on the input model itself
    refused([str(external), "--ratio", "0.2", "-o", str(external)], tmp_path, capsys, "would overwrite the input model")


def test_output_whose_data_file_is_the_inputs_is_refused(tmp_path, capsys):
    source = tmp_path / "model.onnx"
    onnx.save_model(small_model(), str(source), save_as_external_data=True, location="out.onnx.data", size_threshold=0)
    refused([str(source), "--ratio", "0.2", "-o", str(tmp_path / "out.onnx")], tmp_path, capsys,
            "would overwrite the input's external data")


def test_missing_external_data_is_one_line(external, tmp_path, capsys):
    (tmp_path / "model.onnx.data").unlink()
    refused([str(external), "--ratio", "0.2"], tmp_path, capsys, "which is missing beside the model")


def test_external_data_outside_the_models_folder_is_refused(tmp_path, capsys):
    sub = tmp_path / "sub"
    sub.mkdir()
    source = sub / "model.onnx"
    onnx.save_model(small_model(), str(source), save_as_external_data=True, location="w.data", size_threshold=0)
    (sub / "w.data").rename(tmp_path / "w.data")
    proto = onnx.load(str(source), load_external_data=False)
    name = ""
    for t in proto.graph.initializer:
        for entry in t.external_data:
            if entry.key == "location":
                entry.value, name = "../w.data", name or t.name
    onnx.save(proto, str(source))
    before = snapshot(sub)
    refused([str(source), "--ratio", "0.2"], tmp_path, capsys, f"tensor '{name}' keeps its weights in '../w.data', outside")
    assert snapshot(sub) == before


def test_socket_and_pair_files_are_refused(model, tmp_path, capsys):
    sock_path = tmp_path / "s.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        server.bind(str(sock_path))
        refused([str(model), "--ratio", "0.2", "--json", str(sock_path)], tmp_path, capsys, "not a regular file")
    finally:
        server.close()


def test_bench_json_on_a_model_is_refused(model, tmp_path, capsys):
    refused(["bench", str(model), str(model), "--json", str(model), "--runs", "1", "--warmup", "0"], tmp_path, capsys,
            "would overwrite the input model")


def test_plan_outputs_names_both_paths_and_the_flag(tmp_path):
    data = tmp_path / "inputs.npz"
    data.write_bytes(b"x")
    with pytest.raises(model_io.BnSlimError) as err:
        model_io.plan_outputs([("the --data file", data)], {"--export-widths": data})
    assert str(err.value) == f"--export-widths {data}: would overwrite the --data file {data}; pass another --export-widths"

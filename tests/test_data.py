"""Calibration and check inputs: .npz, .npy, image folders with --preprocess, in-memory arrays."""

from __future__ import annotations

import json
import shutil
import sys

import numpy as np
import onnx
import pytest

from onnxslim_bn import prune
from onnxslim_bn.app.cli import main
from onnxslim_bn.errors import BnSlimError
from onnxslim_bn.ir.data import load, parse_preprocess, split
from tests.fixtures import path

VGG = path("vgg")  # input "input" [N, 3, 16, 16], float32


def _vgg() -> onnx.ModelProto:
    return onnx.load(str(VGG))


def _pil():
    return pytest.importorskip("PIL.Image")  # the images extra; the .npy routes need no Pillow


def _write_pngs(folder, count: int, size=(16, 16), seed: int = 0) -> np.ndarray:
    """``count`` random RGB PNGs of ``size`` (H, W); returns their pixels [count, H, W, 3] (uint8)."""
    Image = _pil()
    folder.mkdir()
    pixels = np.random.default_rng(seed).integers(0, 256, (count, *size, 3), dtype=np.uint8)
    for i, p in enumerate(pixels):
        Image.fromarray(p, "RGB").save(folder / f"img{i:03d}.png")
    return pixels


def test_image_folder_round_trip_nchw_bgr_mean_std(tmp_path):
    pixels = _write_pngs(tmp_path / "images", 5)
    (tmp_path / "images" / "notes.txt").write_text("not an image")  # other files are ignored
    samples = load(str(tmp_path / "images"), _vgg(), {"input": [1, 3, 16, 16]},
                   "scale=1/255 mean=0.5,0.4,0.3 std=0.25 order=BGR")
    want = (pixels[..., ::-1].astype(np.float32) / 255 - np.array([0.5, 0.4, 0.3], np.float32)) / np.float32(0.25)
    np.testing.assert_allclose(samples.arrays["input"], want.transpose(0, 3, 1, 2), rtol=0, atol=1e-6)
    assert samples.count == 5 and samples.source == "images/ (5 images)" and samples.arrays["input"].dtype == np.float32


def test_image_folder_nhwc_grayscale_and_resize_crop(tmp_path):
    Image = _pil()
    folder = tmp_path / "gray"
    folder.mkdir()
    Image.new("RGB", (40, 24), (200, 100, 50)).save(folder / "a.png")  # W 40, H 24: resize 12 -> 20x12, crop 8x8
    model = onnx.helper.make_model(onnx.helper.make_graph(
        [onnx.helper.make_node("Identity", ["x"], ["y"])], "g",
        [onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, ["N", 8, 8, 1])],
        [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, ["N", 8, 8, 1])]))
    samples = load(str(folder), model, {"x": [1, 8, 8, 1]}, "resize=12 scale=1")
    gray = Image.new("RGB", (1, 1), (200, 100, 50)).convert("L").getpixel((0, 0))
    assert samples.arrays["x"].shape == (1, 8, 8, 1)
    np.testing.assert_array_equal(samples.arrays["x"], np.full((1, 8, 8, 1), gray, np.float32))


def test_image_folder_prunes_end_to_end_from_the_cli(tmp_path, capsys):
    _write_pngs(tmp_path / "images", 70, size=(20, 24))  # resized to the model's 16x16
    model = tmp_path / "vgg.onnx"
    shutil.copy(VGG, model)
    report = tmp_path / "r.json"
    assert main([str(model), "--ratio", "0.1", "--data", str(tmp_path / "images"), "--preprocess", "mean=0.5 std=0.25",
                 "--report", str(report)]) == 0
    v = json.loads(report.read_text())["verification"]
    assert (v["samples"], v["calibration_samples"]) == (35, 35)  # --data: reconstruction calibrates on the first half
    assert v["inputs"] == "35 samples of images/ (70 images) [35:70], not used for calibration"
    assert "35 samples of images/ (70 images) [35:70]" in capsys.readouterr().out


def test_preprocess_errors_are_one_line(tmp_path):
    _write_pngs(tmp_path / "images", 2)
    for spec, phrase in (("mean=1,2", "2 values for 3 channels"), ("colour=RGB", "unknown key 'colour'"),
                         ("size=0", "size=0"), ("std=0", "divides by zero"), ("order=RBG", "RGB or BGR")):
        with pytest.raises(BnSlimError, match=phrase):
            load(str(tmp_path / "images"), _vgg(), {"input": [1, 3, 16, 16]}, spec)
    with pytest.raises(BnSlimError, match="applies to a folder of images"):
        load({"input": np.zeros((2, 3, 16, 16), np.float32)}, _vgg(), {}, "mean=0.5")


def test_missing_pillow_is_a_one_line_error(tmp_path, monkeypatch):
    _write_pngs(tmp_path / "images", 1)
    monkeypatch.setitem(sys.modules, "PIL", None)
    with pytest.raises(BnSlimError, match=r"needs Pillow: pip install 'onnx-bnslim\[images\]'"):
        load(str(tmp_path / "images"), _vgg(), {"input": [1, 3, 16, 16]})


def test_npy_folder_and_npy_file_need_no_pillow(tmp_path):
    x = np.random.default_rng(1).standard_normal((3, 3, 16, 16)).astype(np.float16)
    (tmp_path / "s").mkdir()
    for i, sample in enumerate(x):
        np.save(tmp_path / "s" / f"{i}.npy", sample if i else sample[None])  # with and without the batch axis
    np.save(tmp_path / "all.npy", x)
    for source in (tmp_path / "s", tmp_path / "all.npy"):
        samples = load(str(source), _vgg(), {})
        assert samples.arrays["input"].dtype == np.float32
        np.testing.assert_array_equal(samples.arrays["input"], x.astype(np.float32))


def test_in_memory_arrays_through_the_api():
    x = np.random.default_rng(2).standard_normal((40, 3, 16, 16)).astype(np.float32)
    result = prune(str(VGG), ratio=0.1, data={"input": x})
    assert result.report.verification.samples == 40
    np.testing.assert_array_equal(result.check_inputs["input"], x)
    assert result.report.options["data"] == "in-memory arrays input: [40, 3, 16, 16]"
    json.dumps(result.report.to_dict())
    bare = prune(str(VGG), ratio=0.1, data=x)  # one input: a bare array will do
    assert bare.report.verification.max_abs_diff == result.report.verification.max_abs_diff


@pytest.mark.parametrize("arrays, phrase", [
    ({"x": np.zeros((2, 3, 16, 16))}, "no array for input 'input'"),
    ({"input": np.zeros((2, 3, 32, 32))}, r"takes \[.*16, 16\] \(axis 2 differs\)"),
    ({"input": np.zeros((3, 16, 16))}, "rank 4"),
    ({"input": np.zeros((0, 3, 16, 16))}, "holds no samples"),
])
def test_data_that_does_not_fit_the_model_is_one_line(arrays, phrase):
    with pytest.raises(BnSlimError, match=phrase):
        load(arrays, _vgg(), {})


def test_split_counts_and_bounds():
    x = np.arange(100)[:, None, None, None] * np.ones((1, 3, 16, 16), np.float32)
    samples = load({"input": x}, _vgg(), {})
    calibration, check, note = split(samples)
    assert (calibration.count, check.count, note) == (50, 50, None)
    assert check.arrays["input"][0, 0, 0, 0] == 50 and check.describe() == "50 samples of in-memory arrays [50:100]"
    with pytest.raises(BnSlimError, match="from 1 to 99"):
        split(samples, 100)
    small = load({"input": x[:10]}, _vgg(), {})
    both = split(small)
    assert both[0] is both[1] and "all 10 serve both" in both[2]


def test_preprocess_spec_parses_fractions_and_sizes():
    pre = parse_preprocess("size=224x200; resize=256 scale=1/255 mean=0.485,0.456,0.406 layout=nhwc order=bgr")
    assert pre.size == (224, 200) and pre.resize == 256 and pre.scale == pytest.approx(1 / 255)
    assert pre.mean == (0.485, 0.456, 0.406) and pre.layout == "NHWC" and pre.order == "BGR"

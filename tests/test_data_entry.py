"""Calibration data validated where it enters (onnxslim_bn.ir.data), and the same user samples in
every stage that runs the model (issue 18): non-finite values, integer and rank-0 inputs, fixed
batch sizes, 16-bit and float images; the probe, the latency timing, bench and sweep --latency
on the user's samples."""

from __future__ import annotations

import hashlib
import math
import shutil

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_bn import BnSlimError, prune
from onnxslim_bn.app import api, bench
from onnxslim_bn.app.cli import main
from onnxslim_bn.app.sweep import sweep
from onnxslim_bn.ir.data import load, split
from onnxslim_bn.options import PruneOptions
from tests.fixtures import path
from tests.graphs import Builder, run

VGG = path("vgg")  # input "input" [N, 3, 16, 16], float32


def _digest(p) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


def _vgg() -> onnx.ModelProto:
    return onnx.load(str(VGG))


def _x(n: int, seed: int = 0, shape=(3, 16, 16)) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((n, *shape)).astype(np.float32)


def int_input_model() -> onnx.ModelProto:
    """Conv-BN-ReLU x2 -> Conv, times an int64 input cast to float: random inputs cannot stand for ``k``."""
    b = Builder(3)
    h = b.op("Relu", [b.bn(b.conv("x", 3, 16), 16)])
    h = b.op("Relu", [b.bn(b.conv(h, 16, 16), 16)])
    y = b.op("Mul", [b.conv(h, 16, 8), b.op("Cast", ["k"], to=TensorProto.FLOAT)])
    graph = helper.make_graph(b.nodes, "int_input", [
        helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 8, 8]),
        helper.make_tensor_value_info("k", TensorProto.INT64, ["N", 1, 1, 1])],
        [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 8, 8, 8])], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


def int_samples(n: int = 40) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(0)
    return {"x": rng.standard_normal((n, 3, 8, 8)).astype(np.float32), "k": rng.integers(1, 4, (n, 1, 1, 1))}


def fixed_batch_model(batch: int = 4) -> onnx.ModelProto:
    b = Builder(1)
    h = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8)])
    return b.model({"x": [batch, 3, 8, 8]}, [b.conv(h, 8, 4)])


# ---------------------------------------------------------------------- non-finite data


@pytest.mark.parametrize("bad, word", [(np.nan, "NaN"), (np.inf, "Inf"), (-np.inf, "Inf")])
def test_non_finite_calibration_data_is_refused_naming_input_and_sample(bad, word):
    x = _x(10)
    x[7, 1, 2, 3] = bad
    with pytest.raises(BnSlimError, match=rf"in-memory arrays: array 'input' holds {word} in sample 7 \(1 non-finite"):
        load({"input": x}, _vgg(), {})


def test_values_that_overflow_the_inputs_dtype_are_refused_as_inf():
    x = np.full((4, 3, 16, 16), 1e39)  # float64: finite, but not as float32
    with pytest.raises(BnSlimError, match="holds Inf once cast to the input's float32 in sample 0"):
        load({"input": x}, _vgg(), {})


def test_a_part_of_the_data_names_the_sample_by_its_index_in_the_source():
    x = _x(6)
    x[4, 0, 0, 0] = np.nan
    whole = load({"input": _x(6)}, _vgg(), {})
    part = whole.part(3, 6)
    part.arrays["input"] = x[3:6]
    from onnxslim_bn.ir.data import _conform, graph_inputs

    with pytest.raises(BnSlimError, match="in sample 4"):
        _conform(part, graph_inputs(_vgg()))


def test_nan_data_is_refused_by_prune_and_by_inspect_hist_before_anything_is_drawn(tmp_path, capsys):
    model = tmp_path / "vgg.onnx"
    shutil.copy(VGG, model)
    data = tmp_path / "cal.npz"
    x = _x(20)
    x[3, 0, 5, 5] = np.nan
    np.savez(data, input=x)
    for args in ([str(model), "--ratio", "0.3", "--data", str(data)],
                 ["inspect", str(model), "--hist", "--data", str(data)]):
        assert main(args) == 1
        err = capsys.readouterr()
        assert len(err.err.strip().splitlines()) == 1 and "cal.npz: array 'input' holds NaN in sample 3" in err.err
        assert "nan" not in err.out.lower()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["cal.npz", "vgg.onnx"]


# ---------------------------------------------------------------------- integer and rank-0 inputs


def test_integer_inputs_are_read_as_given_and_never_random():
    model, samples = int_input_model(), int_samples()
    loaded = load(samples, model, {})
    assert loaded.arrays["k"].dtype == np.int64
    np.testing.assert_array_equal(loaded.arrays["k"], samples["k"])
    as_floats = load({"x": samples["x"], "k": samples["k"].astype(np.float32)}, model, {})
    np.testing.assert_array_equal(as_floats.arrays["k"], samples["k"])  # whole floats are whole numbers
    with pytest.raises(BnSlimError, match=r"array 'k' holds fractions \(1.5 in sample 2\) for an int64 input"):
        load({"x": samples["x"], "k": np.where(np.arange(40)[:, None, None, None] == 2, 1.5, 1.0)}, model, {})
    with pytest.raises(BnSlimError, match="outside the range of the model's int64 input"):
        load({"x": samples["x"], "k": np.full((40, 1, 1, 1), 1e30)}, model, {})
    with pytest.raises(BnSlimError, match="int64 tensor, which N\\(0,1\\) noise cannot stand for"):
        prune(model, ratio=0.3)  # without data: one line asking for it


def rank0_resize_model() -> onnx.ModelProto:
    """x [N, 3, 16, 16] resized by a scalar input ``s`` (a rank-0 tensor): the convs after the
    Resize have shapes inference cannot resolve (they come from ``s``'s value)."""
    b = Builder(5)
    s = b.op("Unsqueeze", ["s", b.const(np.array([0], np.int64))])
    scales = b.op("Concat", [b.const(np.array([1.0, 1.0], np.float32)), s, s], axis=0)
    h = b.op("Resize", ["x", "", scales], mode="nearest")
    h = b.op("Relu", [b.bn(b.conv(h, 3, 16), 16)])
    h = b.op("Relu", [b.bn(b.conv(h, 16, 16), 16)])
    y = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [h])]), 16, 10)
    graph = helper.make_graph(b.nodes, "rank0", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 16, 16]),
                                                 helper.make_tensor_value_info("s", TensorProto.FLOAT, [])],
                              [helper.make_tensor_value_info(y, TensorProto.FLOAT, ["N", 10])], initializer=b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    onnx.checker.check_model(model, full_check=True)
    return model


# Conv 3->16 and 16->16 (3x3) at 64x64 (16 * 4) and the Gemm 16->10, counted by hand
RANK0_MACS = 16 * 64 * 64 * 3 * 9 + 16 * 64 * 64 * 16 * 9 + 16 * 10


def test_a_rank0_input_takes_one_value_fed_to_every_run():
    model = rank0_resize_model()
    samples = load({"x": _x(40), "s": np.float32(4.0)}, model, {})
    assert samples.count == 40 and samples.arrays["s"].shape == ()
    assert samples.part(0, 10).arrays["s"] == np.float32(4.0) and samples.part(0, 10).count == 10
    with pytest.raises(BnSlimError, match=r"the model input is a scalar \(rank 0\): give one value"):
        load({"x": _x(40), "s": np.full(40, 4.0, np.float32)}, model, {})
    for compensation in ("bias", "reconstruct"):
        result = prune(model, target_macs=0.6, round_to=1, compensation=compensation,
                       data={"x": _x(40), "s": np.float32(4.0)})
        assert result.report.verification.samples == 40
        x = _x(3, seed=9)
        before = run(model, {"x": x, "s": np.array(4.0, np.float32)})[0]
        after = run(result.model, {"x": x, "s": np.array(4.0, np.float32)})[0]
        assert after.shape == before.shape == (3, 10) and np.isfinite(after).all()


# ---------------------------------------------------------------------- fixed batch sizes


def test_fewer_samples_than_a_fixed_batch_is_one_line_and_enough_prune():
    model = fixed_batch_model(4)
    with pytest.raises(BnSlimError, match="3 samples, but input 'x' fixes its batch size at 4: give at least 4"):
        load({"x": _x(3, shape=(3, 8, 8))}, model, {})
    for options in ({"compensation": "bias", "importance": "data"}, {"compensation": "reconstruct"}):
        with pytest.raises(BnSlimError, match="fixes its batch size at 4"):
            prune(model, ratio=0.3, data={"x": _x(3, shape=(3, 8, 8))}, **options)
        result = prune(model, ratio=0.3, round_to=1, data={"x": _x(6, shape=(3, 8, 8))}, **options)
        assert result.report.verification.samples == 6


def test_calibration_and_check_each_get_a_whole_fixed_batch():
    samples = load({"x": _x(100, shape=(3, 8, 8))}, fixed_batch_model(64), {})
    calibration, check, note = split(samples)  # halves of 50 < 64: all serve both, said so
    assert calibration is check and "serve both" in note
    samples = load({"x": _x(12, shape=(3, 8, 8))}, fixed_batch_model(4), {})
    with pytest.raises(BnSlimError, match="need 4 samples each; .* pass a count from 4 to 8"):
        split(samples, 2)
    assert [p.count for p in split(samples, 4)[:2]] == [4, 8]


# ---------------------------------------------------------------------- images


def _pil():
    return pytest.importorskip("PIL.Image")


def test_16_bit_pngs_are_scaled_by_their_bit_depth_not_clipped(tmp_path):
    Image = _pil()
    folder = tmp_path / "png16"
    folder.mkdir()
    values = np.random.default_rng(0).integers(0, 65536, (3, 16, 16)).astype(np.uint16)
    values[0, 0, 0], values[1, 0, 0] = 65535, 0
    for i, v in enumerate(values):
        Image.fromarray(v).save(folder / f"{i}.png")
    assert Image.open(folder / "0.png").mode.startswith("I")  # read as 16 bits, not 8
    model = _vgg()
    got = load(str(folder), model, {}).arrays["input"]  # default scale 1/255: 65535 -> 1.0
    expected = values.astype(np.float64) / 65535
    for c in range(3):  # grayscale into the model's 3 channels
        np.testing.assert_allclose(got[:, c], expected, rtol=0, atol=1e-6)
    assert got.max() == pytest.approx(1.0, abs=1e-6)
    assert (got >= 1.0 - 1e-6).mean() < 0.01  # not 99% saturated as when clipped at 255


def test_float_tiffs_are_refused_with_the_npy_route(tmp_path):
    Image = _pil()
    folder = tmp_path / "tif"
    folder.mkdir()
    Image.fromarray(np.linspace(0, 1, 256, dtype=np.float32).reshape(16, 16), "F").save(folder / "a.tif")
    with pytest.raises(BnSlimError, match=r"a.tif: float pixels \(Pillow mode F\) have no bit depth .* \.npy files"):
        load(str(folder), _vgg(), {})


# ---------------------------------------------------------------------- the same samples everywhere


def test_batch_of_takes_the_first_samples_cycling_and_keeps_scalars():
    a = np.arange(3)[:, None] * np.ones((1, 2))
    got = bench.batch_of({"a": a, "s": np.float32(2)}, 5)
    np.testing.assert_array_equal(got["a"][:, 0], [0, 1, 2, 0, 1])
    assert got["s"].shape == ()


def test_an_int64_input_model_times_on_the_users_samples(tmp_path, monkeypatch, capsys):
    model, samples = int_input_model(), int_samples()
    seen = []
    real_probe = api.probe

    def probe(original, pruned, feeds, **kw):
        seen.append(feeds)
        return real_probe(original, pruned, feeds, runs=2, min_seconds=0.0, **kw)

    monkeypatch.setattr(api, "probe", probe)
    result = prune(model, ratio=0.3, round_to=1, data=samples, probe=True)  # the probe ran on the samples
    np.testing.assert_array_equal(seen[0]["k"], samples["k"][:1])
    np.testing.assert_array_equal(seen[0]["x"], samples["x"][:1])
    assert result.report.probe is not None

    timed = []
    monkeypatch.setattr(api, "time_pair", lambda a, b, rt, feeds, threads=None: (timed.append(feeds), (1.0, 0.5))[1])
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    prune(model, target_latency=0.9, round_to=1, latency_batch=3, data=samples, verify=False)
    np.testing.assert_array_equal(timed[0]["k"], samples["k"][:3])

    original, pruned, data = tmp_path / "int.onnx", tmp_path / "int.slim.onnx", tmp_path / "int.npz"
    onnx.save(model, str(original))
    onnx.save(result.model, str(pruned))
    np.savez(data, **samples)
    assert main(["bench", str(original), str(pruned), "--data", str(data), "--runs", "2", "--warmup", "0",
                 "--runtimes", "onnxruntime", "--batch", "1,3", "-q", "--json", str(tmp_path / "b.json")]) == 0
    import json

    done = json.loads((tmp_path / "b.json").read_text())
    assert [r["batch"] for r in done["rows"]] == [1, 3] and any("40 samples of int.npz" in n for n in done["notes"])
    assert main(["bench", str(original), str(pruned), "--runs", "2", "--runtimes", "onnxruntime", "-q"]) == 1
    assert "pass real inputs with --data" in capsys.readouterr().err

    point = sweep(model, PruneOptions(round_to="1", data=samples), "ratio", [0.3], latency=True).points[0]
    assert point.error is None and point.speedup > 0


# ---------------------------------------------------------------------- the bad-data corpus, from the CLI


def _vgg_x(n=20, at=None, value=np.nan, dtype=np.float32):
    x = _x(n).astype(dtype)
    if at is not None:
        x[at] = value
    return {"input": x}


def _write_float_tiffs(folder):
    Image = _pil()
    folder.mkdir()
    for i in range(2):
        Image.fromarray(np.full((16, 16), 0.5, np.float32), "F").save(folder / f"{i}.tif")


# case: (model, write the data at this path, extra flags, the words of the one line)
DATA_BAD = {
    "nan": (VGG, lambda p: np.savez(p, **_vgg_x(at=(11, 0, 1, 1))), [], "d.npz: array 'input' holds NaN in sample 11"),
    "inf": (VGG, lambda p: np.savez(p, **_vgg_x(at=(0, 2, 3, 4), value=np.inf)), [], "holds Inf in sample 0"),
    "overflow": (VGG, lambda p: np.savez(p, input=np.full((4, 3, 16, 16), 3e38, np.float64) * 10), [],
                 "holds Inf once cast to the input's float32 in sample 0"),
    "nan-npy": (VGG, lambda p: np.save(p.with_suffix(".npy"), _vgg_x(at=(5, 0, 0, 0))["input"]), [],
                "d.npy: array 'input' holds NaN in sample 5"),
    "fewer-than-batch": ("fixed", lambda p: np.savez(p, x=_x(3, shape=(3, 8, 8))), [],
                         "3 samples, but input 'x' fixes its batch size at 4"),
    "calibration-below-batch": ("fixed", lambda p: np.savez(p, x=_x(12, shape=(3, 8, 8))),
                                ["--calibration-samples", "2"], "need 4 samples each"),
    "int-fractions": ("int", lambda p: np.savez(p, x=int_samples()["x"], k=int_samples()["k"] + 0.25), [],
                      "array 'k' holds fractions (3.25 in sample 0) for an int64 input"),
    "int-range": ("int", lambda p: np.savez(p, x=int_samples()["x"], k=np.full((40, 1, 1, 1), 1e20)), [],
                  "outside the range of the model's int64 input"),
    "rank0-vector": ("rank0", lambda p: np.savez(p, x=_x(8), s=np.full(8, 4.0, np.float32)), [],
                     "the model input is a scalar (rank 0)"),
    "float-tiff": (VGG, lambda p: _write_float_tiffs(p.with_suffix("")), [],
                   "float pixels (Pillow mode F) have no bit depth"),
}


@pytest.mark.parametrize("case", list(DATA_BAD))
def test_bad_data_is_one_line_nonzero_no_output_inputs_untouched(case, tmp_path, capsys):
    source, write, extra, words = DATA_BAD[case]
    model = tmp_path / "model.onnx"
    built = {"fixed": fixed_batch_model, "int": int_input_model, "rank0": rank0_resize_model}
    if isinstance(source, str):
        onnx.save(built[source](), str(model))
    else:
        shutil.copy(source, model)
    write(tmp_path / "d.npz")
    data = next(p for p in tmp_path.iterdir() if p.name != "model.onnx")
    if case == "float-tiff":
        _pil()
    files = {p.name: _digest(p) for p in tmp_path.rglob("*") if p.is_file()}
    commands = [[str(model), "--ratio", "0.3"]]
    if not extra:  # sweep takes no --calibration-samples
        commands.append(["sweep", str(model), "--ratios", "0.3", "--latency"])
    for command in commands:
        assert main([*command, "--data", str(data), *extra]) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1, err
        assert words in err and "Traceback" not in err, err
        assert {p.name: _digest(p) for p in tmp_path.rglob("*") if p.is_file()} == files


def test_the_histogram_never_draws_nan_even_from_nan_scores():
    from onnxslim_bn.app.histogram import ascii_histogram, summary
    from onnxslim_bn.app.report import SpaceReport

    scores = [0.5, math.nan, 0.01, 1e-6, math.inf, 0.2]
    space = SpaceReport(["conv"], 6, 3, "bn", ["bn"], 1e-6, 0.1, 0.5, None, scores, removed=[1, 3, 2])
    text = ascii_histogram([space])
    assert "nan" not in text.lower() and "inf" not in text.lower() and "4 channels" in text
    assert "cut at 0.01" in text
    assert summary([space])["cut"] == 0.01 and summary([space])["channels"] == 4
    empty = SpaceReport(["conv"], 2, 2, "bn", ["bn"], None, None, None, None, [math.nan, math.nan], removed=[0])
    assert ascii_histogram([empty]) == "No prunable channel has a score: nothing to draw."

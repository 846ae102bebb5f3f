"""Calibration reducers and reconstruction (least-squares refit of the layers after a cut)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import helper, numpy_helper

from onnxslim_bn import prune
from onnxslim_bn.errors import BnSlimError
from onnxslim_bn.passes.calibrate import Gram, Moments, Patches, calibrate, sample_positions
from onnxslim_bn.passes.reconstruct import kept_outputs, reconstruct

from .graphs import Builder, random_input, run, without_carriers

H = 10


def _two_stage(consumer_k: int, dead: np.ndarray | None, head: str = "conv", seed: int = 3) -> onnx.ModelProto:
    """conv3x3 -> BN (``dead`` channels: gamma 0, beta random) -> ReLU -> consumer -> BN -> ReLU -> head."""
    b = Builder(seed=seed)
    x = b.op("Relu", [b.bn(b.conv("x", 3, 16, k=3), 16, dead=dead, beta_dead=None)])
    y = b.op("Relu", [b.bn(b.conv(x, 16, 16, k=consumer_k), 16)])
    if head == "conv":
        out = b.conv(y, 16, 6, k=3)
    else:  # pooled features into Gemm or MatMul
        flat = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
        if head == "gemm":
            out = b.gemm(flat, 16, 6)
        else:
            out = b.op("MatMul", [flat, b.const(b.rng.standard_normal((16, 6)).astype(np.float32), "mw")])
    return b.model({"x": [None, 3, H, H]}, [out])


def _consumer_bias_to_zero(model: onnx.ModelProto, node_name: str) -> onnx.ModelProto:
    """Undo the bias folding of one layer: the pruned model then ignores the removed constants."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    node = next(n for n in out.graph.node if n.name == node_name)
    init = next(t for t in out.graph.initializer if t.name == node.input[2])
    init.CopyFrom(numpy_helper.from_array(np.zeros_like(numpy_helper.to_array(init)), init.name))
    return out


def _mse(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.mean((a.astype(np.float64) - b) ** 2))


# ------------------------------------------------------------------------------------ reducers
def test_moments_match_numpy_over_chunks():
    rng = np.random.default_rng(0)
    chunks = [rng.normal(2.0, 3.0, (n, 5, 4, 3)) for n in (7, 1, 12)]
    m = Moments()
    for c in chunks:
        m.update(c)
    whole = np.moveaxis(np.concatenate(chunks), 1, -1).reshape(-1, 5)
    np.testing.assert_allclose(m.mean, whole.mean(0), rtol=1e-12)
    np.testing.assert_allclose(m.var, whole.var(0), rtol=1e-10)


@pytest.mark.parametrize("stride,pads,dilation,group", [(1, (1, 1, 1, 1), 1, 1), (2, (0, 1, 2, 0), 1, 2),
                                                        (1, (2, 2, 2, 2), 2, 1), (2, (1, 1, 1, 1), 1, 4)])
def test_patches_times_weights_reproduce_the_conv(stride, pads, dilation, group):
    """Rows at sampled positions, multiplied by the weight of their group, are the Conv's output there."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((8, 8 // group, 3, 3)).astype(np.float32)
    bias = rng.standard_normal(8).astype(np.float32)
    node = helper.make_node("Conv", ["x", "w", "b"], ["y"], kernel_shape=[3, 3], strides=[stride, stride],
                            pads=list(pads), dilations=[dilation, dilation], group=group)
    graph = helper.make_graph([node], "g",
                              [helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [None, 8, 9, 11])],
                              [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [numpy_helper.from_array(w, "w"), numpy_helper.from_array(bias, "b")])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    x = rng.standard_normal((3, 8, 9, 11)).astype(np.float32)
    y = run(model, {"x": x})[0]
    patches = Patches.for_conv(node, w.shape, (9, 11))
    assert patches.output_spatial((9, 11)) == y.shape[2:]
    pos = sample_positions(patches.positions(x.shape), 5, seed=0, layer=0, samples=np.arange(3))
    rows = patches.rows(x, pos)  # [n, P, g, d]
    per = 8 // group
    got = np.concatenate([rows[:, :, j] @ w[j * per:(j + 1) * per].reshape(per, -1).T for j in range(group)], -1) + bias
    want = y.reshape(3, 8, -1).transpose(0, 2, 1)[np.arange(3)[:, None], pos]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_gram_matches_numpy_and_positions_are_capped():
    """AᵀA and AᵀY of the calibration stage equal numpy's on the same rows; every sample gives
    exactly max_positions rows, the same ones however the samples are chunked."""
    b = Builder(seed=2)
    y = b.conv("x", 3, 4, k=3)
    model = b.model({"x": [None, 3, H, H]}, [y])
    x = random_input([6, 3, H, H])
    node = next(n for n in model.graph.node if n.op_type == "Conv")
    patches = Patches.for_conv(node, (4, 3, 3, 3), (H, H))
    cal = calibrate(model, {"x": x}, moments=[y], grams={"x": patches}, max_positions=7, seed=5)
    gram = cal.grams["x"]
    assert gram.rows == 6 * 7 and gram.positions_per_sample == 7
    pos = sample_positions(H * H, 7, 5, 0, np.arange(6))
    a = np.concatenate([patches.rows(x, pos).reshape(42, -1), np.ones((42, 1))], 1)
    np.testing.assert_allclose(gram.ata[0], a.T @ a, rtol=1e-10)
    out = run(model, {"x": x})[0]
    np.testing.assert_allclose(cal.moments[y].mean, out.mean((0, 2, 3)), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(cal.moments[y].var, out.var((0, 2, 3)), rtol=1e-4)
    # the same rows from two chunks, with targets
    split = Gram(patches, 7, seed=5, layer=0)
    targets = Gram(patches, 7, seed=5, layer=0).target_rows(out, np.arange(6))
    for part in (slice(0, 2), slice(2, 6)):
        ids = np.arange(6)[part]
        split.update(x[part], ids, Gram(patches, 7, seed=5).target_rows(out[part], ids))
    np.testing.assert_allclose(split.ata[0], a.T @ a, rtol=1e-10)
    np.testing.assert_allclose(split.atr[0], a.T @ targets.reshape(42, -1), rtol=1e-6)


# ------------------------------------------------------------------------------- reconstruction
@pytest.mark.parametrize("head", ["conv", "gemm", "matmul"])
def test_exact_when_the_removed_channels_were_constant(head):
    """Dead channels (gamma 0, beta != 0) removed and their constants NOT folded: the refit
    finds the bias itself and reproduces the original to 1e-5 (unpadded consumer)."""
    model = _two_stage(1, dead=np.array([1, 5, 9, 12]), head=head)
    pruned = prune(model, threshold=1e-3, round_to=1, verify=False, compensation="bias").model
    shapes = {t.name: tuple(t.dims) for t in pruned.graph.initializer}
    consumer = next(n for n in pruned.graph.node if n.op_type == "Conv" and len(n.input) > 2
                    and shapes[n.input[1]][1] == 12)
    broken = _consumer_bias_to_zero(pruned, consumer.name)
    calib, test = {"x": random_input([24, 3, H, H], seed=1)}, {"x": random_input([16, 3, H, H], seed=9)}
    want = run(model, test)[0]
    assert np.abs(run(broken, test)[0] - want).max() > 0.05  # the constants mattered
    refit, report = reconstruct(model, broken, calib, downstream=False)
    assert [f.node for f in report.layers] == [consumer.name] and report.skipped == []
    assert report.layers[0].input_channels == (12, 16)
    assert report.layers[0].error_before > 0.05 and report.layers[0].error_after < 1e-5
    np.testing.assert_allclose(run(refit, test)[0], want, atol=1e-5 * max(1.0, np.abs(want).max()))
    # downstream layers (their input changed) are refit too by default; exact inputs keep them exact
    refit, report = reconstruct(model, broken, calib)
    assert report.layers[0].node == consumer.name and all(f.downstream for f in report.layers[1:])
    assert all(f.error_after < 1e-5 for f in report.layers)
    if head == "conv":
        assert len(report.layers) == 2
    else:  # a pooled Gemm / MatMul gets one row per sample: 24 rows for 17 unknowns is too few
        assert len(report.layers) == 1 and "too few" in report.skipped[0][1]
    np.testing.assert_allclose(run(refit, test)[0], want, atol=1e-5 * max(1.0, np.abs(want).max()))
    onnx.checker.check_model(refit, full_check=True)


def test_padded_consumer_constant_channels_beat_bias_folding_at_borders(monkeypatch):
    """With a padded consumer, bias folding without a carrier (select.carriers) is exact inside
    and wrong at the borders (the original saw zero padding there, not the constant); the refit
    balances both and is closer. A plain conv cannot be exact at the borders: the error stays."""
    without_carriers(monkeypatch)
    model = _two_stage(3, dead=np.array([1, 5, 9, 12]))
    pruned = prune(model, threshold=1e-3, round_to=1, verify=False, compensation="bias").model
    calib, test = {"x": random_input([32, 3, H, H], seed=1)}, {"x": random_input([32, 3, H, H], seed=9)}
    want = run(model, test)[0]
    refit, report = reconstruct(model, pruned, calib)
    folded, fitted = _mse(run(pruned, test)[0], want), _mse(run(refit, test)[0], want)
    assert fitted < 0.7 * folded and fitted > 0
    assert report.layers[0].error_after < report.layers[0].error_before


def test_a_kept_border_map_goes_behind_the_next_bn_and_stays_exact():
    """Constant removed channels into a padded 3x3 conv that a BN reads: the refit keeps the
    border map (--exact-borders) and puts it behind the BN, scaled by it, so that the conv and
    its BN are adjacent again (onnxruntime fuses them, in FP32 and before INT8); still exact."""
    model = _two_stage(3, dead=np.array([1, 5, 9, 12]))
    pruned = prune(model, threshold=1e-3, round_to=1, verify=False, compensation="bias", exact_borders=True).model
    calib, test = {"x": random_input([32, 3, H, H], seed=1)}, {"x": random_input([32, 3, H, H], seed=9)}
    refit, report = reconstruct(model, pruned, calib, keep_maps=True)  # the tiny model: a map outweighs it
    assert report.maps_kept == 1
    init = {t.name: t for t in refit.graph.initializer}
    maps = [n for n in refit.graph.node if n.op_type == "Add" and n.input[1] in init and len(init[n.input[1]].dims) == 4]
    producer = {o: n for n in refit.graph.node for o in n.output}
    assert len(maps) == 1 and producer[maps[0].input[0]].op_type == "BatchNormalization"
    assert producer[producer[maps[0].input[0]].input[0]].op_type == "Conv"
    want = run(model, test)[0]
    np.testing.assert_allclose(run(refit, test)[0], want, atol=1e-4 * np.abs(want).max())
    onnx.checker.check_model(refit, full_check=True)


def test_lowers_the_error_of_a_live_channel_cut_and_chains_layers():
    """Removing live channels (ratio 0.3, nothing dead): on held-out inputs the refit model is
    closer to the original than bias folding; two consumers in a chain, refit in order."""
    model = _two_stage(3, dead=None)
    pruned = prune(model, ratio=0.3, round_to=1, verify=False, compensation="bias").model
    calib, test = {"x": random_input([64, 3, H, H], seed=1)}, {"x": random_input([64, 3, H, H], seed=9)}
    want = run(model, test)[0]
    refit, report = reconstruct(model, pruned, calib, max_positions=32)
    assert len(report.layers) == 2 and report.levels == 2
    assert all(f.error_after < f.error_before for f in report.layers)
    assert all(f.rows == 64 * 32 for f in report.layers)  # positions cap: 32 of the 100 per sample
    assert _mse(run(refit, test)[0], want) < 0.6 * _mse(run(pruned, test)[0], want)


@pytest.mark.parametrize("group", [16, 4])
def test_grouped_and_depthwise_consumers_are_refit_per_group(group):
    """conv -> BN -> ReLU -> grouped 3x3 (depthwise at 16) -> BN -> ReLU -> project 1x1:
    the grouped layer (each output reads its group's inputs) and the projection are both refit."""
    b = Builder(seed=4 if group == 16 else 5)
    first = b.conv("x", 3, 16, k=1, pad=0) if group == 16 else b.conv("x", 3, 16, k=3)
    x = b.op("Relu", [b.bn(first, 16)])
    d = b.op("Relu", [b.bn(b.conv(x, 16, 16, k=3, group=group), 16)])
    out = b.conv(d, 16, 6, k=1, pad=0)
    model = b.model({"x": [None, 3, H, H]}, [out])
    pruned = prune(model, ratio=0.3, round_to=1, verify=False, compensation="bias").model
    calib, test = {"x": random_input([48, 3, H, H], seed=1)}, {"x": random_input([48, 3, H, H], seed=9)}
    refit, report = reconstruct(model, pruned, calib)
    assert {f.op for f in report.layers} == {"Conv"} and len(report.layers) == 2
    want = run(model, test)[0]
    assert _mse(run(refit, test)[0], want) < _mse(run(pruned, test)[0], want)


def test_kept_outputs_are_read_from_the_weights():
    rng = np.random.default_rng(0)
    w = rng.standard_normal((10, 6, 9))
    rows, cols = np.array([0, 3, 4, 8]), np.array([1, 2, 5])
    np.testing.assert_array_equal(kept_outputs(w, 1, w[rows][:, cols], 1), rows)
    np.testing.assert_array_equal(kept_outputs(w, 2, w[[0, 3, 5, 8]][:, cols], 2), [0, 3, 5, 8])
    assert kept_outputs(w, 1, rng.standard_normal((4, 3, 9)), 1) is None


def test_prune_api_reconstructs_with_data_and_refuses_without():
    model = _two_stage(1, dead=None)
    samples = random_input([96, 3, H, H], seed=1)
    result = prune(model, ratio=0.3, round_to=1, data={"x": samples})  # auto: data given -> reconstruct
    assert result.reconstruction is not None and len(result.reconstruction.layers) == 2
    assert result.reconstruction.samples == 48  # the calibration half; the check has the other half
    assert any(n.startswith("reconstruction: 2 layers") for n in result.report.notes)
    assert prune(model, ratio=0.3, round_to=1, data={"x": samples}, compensation="bias").reconstruction is None
    with pytest.raises(BnSlimError, match="--compensation reconstruct"):
        prune(model, ratio=0.3, compensation="reconstruct")
    with pytest.raises(BnSlimError, match="auto, bias or reconstruct"):
        prune(model, ratio=0.3, compensation="lsq")


def test_cli_compensation_flag(tmp_path, capsys):
    from onnxslim_bn.app.cli import main

    model = _two_stage(1, dead=None)
    path, data = tmp_path / "m.onnx", tmp_path / "d.npz"
    onnx.save(model, path)
    np.savez(data, x=random_input([96, 3, H, H], seed=1))
    # --no-probe: on a 40 us model the probe's verdict is noise, and a cut it finds slower is replaced
    assert main([str(path), "--ratio", "0.3", "--round-to", "1", "--data", str(data), "--compensation", "reconstruct",
                 "--no-probe", "-o", str(tmp_path / "r.onnx")]) == 0
    assert "reconstruction: 2 layers refit on 48 calibration samples" in capsys.readouterr().out
    assert main([str(path), "--ratio", "0.3", "--compensation", "reconstruct", "-o", str(tmp_path / "s.onnx")]) == 1
    assert "--compensation reconstruct refits layers on calibration data" in capsys.readouterr().err
    assert not (tmp_path / "s.onnx").exists()

"""A refit with fewer sampled rows than CV_ROWS_PER_UNKNOWN per unknown chooses its ridge by
two-fold cross validation over the calibration samples: an under-determined layer refit without
it matches the calibration samples and generalises worse."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim_bn.passes import reconstruct as refit
from onnxslim_bn.passes.calibrate import Gram, Patches

from .graphs import Builder, run


def _mlp(hidden: int) -> onnx.ModelProto:
    """x [N, 12] -> Gemm (12 -> hidden) -> Relu -> Gemm (hidden -> 5)."""
    b = Builder(seed=21)
    h = b.op("Relu", [b.gemm("x", 12, hidden)])
    out = b.gemm(h, hidden, 5)
    return b.model({"x": [None, 12]}, [out], {out: [None, 5]})


def _cut(model: onnx.ModelProto, kept: np.ndarray) -> onnx.ModelProto:
    """The first Gemm keeps the hidden units ``kept``, the second reads only those (no bias folding)."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    first, second = out.graph.node[0], out.graph.node[2]
    inits = {t.name: t for t in out.graph.initializer}
    for name, rows in ((first.input[1], True), (first.input[2], True), (second.input[1], False)):
        values = numpy_helper.to_array(inits[name])
        values = values[kept] if rows else values[:, kept]
        inits[name].CopyFrom(numpy_helper.from_array(values, name))
    return out


def _held_out_error(original, pruned, x) -> float:
    return float(np.mean((run(original, {"x": x})[0] - run(pruned, {"x": x})[0]) ** 2))


def test_an_under_determined_refit_chooses_a_larger_ridge_and_generalises_better(monkeypatch):
    model = _mlp(48)
    pruned = _cut(model, np.arange(0, 48, 2))  # half the hidden units: 25 unknowns per output
    rng = np.random.default_rng(8)
    calib = rng.standard_normal((40, 12)).astype(np.float32)  # 40 rows < 2 x 25
    held = rng.standard_normal((2000, 12)).astype(np.float32)
    chosen, report = refit.reconstruct(model, pruned, {"x": calib})
    fit = next(f for f in report.layers if f.node == model.graph.node[2].name)
    assert fit.rows == 40 and fit.ridge > refit.RIDGE
    monkeypatch.setattr(refit, "CV_ROWS_PER_UNKNOWN", 0)  # the fixed ridge, as before
    fixed, report_fixed = refit.reconstruct(model, pruned, {"x": calib})
    assert next(f for f in report_fixed.layers if f.node == fit.node).ridge == refit.RIDGE
    # the fixed ridge fits the calibration rows closer and the held-out samples worse
    assert next(f for f in report_fixed.layers if f.node == fit.node).error_after < fit.error_after
    assert _held_out_error(model, chosen, held) < 0.8 * _held_out_error(model, fixed, held)


def test_enough_rows_keep_the_default_ridge():
    model = _mlp(48)
    pruned = _cut(model, np.arange(0, 48, 2))
    calib = np.random.default_rng(9).standard_normal((400, 12)).astype(np.float32)
    _, report = refit.reconstruct(model, pruned, {"x": calib})
    assert all(f.ridge == refit.RIDGE for f in report.layers)


def test_merged_folds_equal_one_gram_of_all_rows():
    rng = np.random.default_rng(2)
    x, y, w0 = rng.standard_normal((10, 6)), rng.standard_normal((10, 1, 3)), rng.standard_normal((1, 7, 3))
    samples = np.arange(10)
    whole = Gram(Patches(), 1)
    whole.update(x[:, None, :], samples, y, w0)
    parts = [Gram(Patches(), 1) for _ in range(2)]
    for k, part in enumerate(parts):
        pick = samples % 2 == k
        part.update(x[pick][:, None, :], samples[pick], y[pick], w0)
    merged = Gram.merged(parts)
    for key in ("ata", "atr", "rr", "ysum", "yy"):
        np.testing.assert_allclose(getattr(merged, key), getattr(whole, key), rtol=1e-12)
    assert merged.rows == whole.rows == 10
    assert merged.residual() == pytest.approx(whole.residual(), rel=1e-12)

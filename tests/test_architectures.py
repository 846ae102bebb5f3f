"""Architectures people deploy (fixtures/architectures.py): pruned end to end, BN kept and folded.

Their dead channels have gamma = beta = 0 exactly, so pruning exactly those must reproduce
the outputs; a ratio of 0.5 must give a valid, smaller model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim_bn import inspect, prune
from onnxslim_bn.app.report import coverage
from tests.graphs import run

ARCH = Path(__file__).resolve().parent.parent / "fixtures" / "arch"
# prunable share of layer output channels we reach, and the reason for what stays
EXPECTED = {
    # the SE convs and the head Linear never had a BN: no scale ranks them, in any export form
    "mobilenetv3": (0.76, "no BatchNorm scale"), "efficientnet": (0.75, None), "unet": (0.95, None), "yolo": (0.90, "Reshape"),
    "grouped": (0.90, None), "shufflenet": (0.55, "the channel"),  # Shape reads the channel count, or Reshape changes the channel axis
}
FORMS = ["", ".folded", ".dynamo", ".dynamo-kept"]


def x(batch: int = 2) -> np.ndarray:
    return np.random.default_rng(7).standard_normal((batch, 3, 32, 32)).astype(np.float32)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_dead_channels_go_and_outputs_stay(name, form):
    path = str(ARCH / f"{name}{form}.onnx")
    model = onnx.load(path)
    result = prune(path, threshold=1e-6, min_channels=1, round_to=1)
    assert result.report.removed_channels > 0
    before, after = run(model, {"input": x()})[0], run(result.model, {"input": x()})[0]
    assert before.shape == after.shape
    np.testing.assert_allclose(after, before, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_coverage_and_blocked_reasons(name, form):
    least, reason = EXPECTED[name]
    cov = coverage(inspect(str(ARCH / f"{name}{form}.onnx")).spaces)
    assert cov["prunable_fraction"] >= least, cov
    if reason:
        assert any(reason in r for r in cov["blocked_by_reason"]), cov["blocked_by_reason"]


@pytest.mark.parametrize("form", FORMS)
@pytest.mark.parametrize("name", list(EXPECTED))
def test_half_the_channels_gives_a_valid_smaller_model(name, form):
    # default widths round up only (issue 16): a model whose layers are all narrow against the
    # machine's block (the grouped one: 16 per group) may keep every layer whole, and says so;
    # unrounded, half the channels always make it smaller
    result = prune(str(ARCH / f"{name}{form}.onnx"), ratio=0.5)
    assert result.report.after.macs <= result.report.before.macs
    if result.report.after.macs == result.report.before.macs:
        assert result.report.selection["kept_by_rounding"] > 0
        assert "rounding widths up" in result.report.table()
    exact = prune(str(ARCH / f"{name}{form}.onnx"), ratio=0.5, round_to=1, verify=False)
    assert exact.report.after.macs < exact.report.before.macs
    original = onnx.load(str(ARCH / f"{name}{form}.onnx"))
    assert run(result.model, {"input": x(3)})[0].shape == run(original, {"input": x(3)})[0].shape

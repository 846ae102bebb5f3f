"""Budgets on narrow layers (a finer block when the machine's block cannot come near the
budget), and pruning a model this tool already pruned."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_bn import prune
from onnxslim_bn.passes.select import BUDGET_SLACK
from tests.fixtures import FIXTURES

PLAIN = FIXTURES / "plain"


def _calibration() -> dict[str, np.ndarray]:
    return {"input": np.load(PLAIN / "calibration.npz")["input"]}


@pytest.fixture
def block_16(monkeypatch):
    """--round-to auto resolves to 16 whatever this machine's kernels are."""
    monkeypatch.setattr("onnxslim_bn.hardware.channel_block", lambda *a, **k: (16, "a test's block"))


def test_a_block_too_coarse_for_the_budget_gives_way_to_a_finer_one(block_16):
    # the plain DenseNet's growth layers are 12 and 24 wide: on a block of 16 the nearest plan under
    # 70% of the MACs keeps about 63%, far under the budget; a block of 8 comes within the slack
    result = prune(str(PLAIN / "densenet.onnx"), target_macs=0.7, data=_calibration(),
                   compensation="bias", verify=False)
    budget = result.report.selection["budget"]
    reached = result.report.after.macs / result.report.before.macs
    assert 0.7 - BUDGET_SLACK <= reached <= 0.7, reached
    assert budget["round_to"] < 16
    assert any(n.startswith(f"widths rounded to multiples of {budget['round_to']}, not 16") for n in result.report.notes)
    # every pruned width of a space wider than the block is on the block that was used
    for space in result.report.spaces:
        if space.kept < space.channels and space.channels >= 2 * budget["round_to"]:
            assert space.kept % budget["round_to"] == 0 or space.kept == space.channels, space


def test_a_block_that_can_meet_the_budget_is_kept(block_16):
    result = prune(str(PLAIN / "resnet.onnx"), target_macs=0.7, data=_calibration(),
                   compensation="bias", verify=False)
    assert result.report.selection["budget"]["round_to"] == 16
    assert not any(n.startswith("widths rounded to multiples") for n in result.report.notes)


def test_a_model_pruned_by_the_tool_can_be_pruned_again():
    first = prune(str(PLAIN / "vgg.onnx"), target_macs=0.8, data=_calibration(), verify=False)
    second = prune(first.model, target_macs=0.8, data=_calibration())
    keys = [p.key for p in second.model.metadata_props]
    assert len(keys) == len(set(keys)), keys  # this run's keys replace the first run's
    assert second.report.after.macs <= 0.8 * second.report.before.macs
    assert second.report.before.macs == first.report.after.macs

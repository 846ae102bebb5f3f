"""The zoo (fixtures/zoo.py): torchvision-shaped architectures, BN kept and folded, against a
structural PyTorch pruner removing the same channels.

Every model has ~40% of each dependency group's channels dead (gamma = 0 at every BN of the
group, beta != 0). ``fixtures/zoo/manifest.json`` holds, per model, the MACs of the same
architecture built with those channels removed (equal to Torch-Pruning's on the same channels)
and ``exact_ideal_kept``: the same, keeping the dead channels whose constant act(beta) != 0 is
multiplied by a squeeze-excitation gate (no pruner can drop those exactly; Torch-Pruning does).
Pruning must reproduce the original (cosine >= 0.9999 and max |diff| <= 5e-5 of the output's
range over 32 seeded samples) and keep no more than that ideal MAC fraction + 0.01.
Two selections: ``--threshold`` just above 0, and ``--ratio`` at the dead fraction of the
channels the tool ranks (issue 8's protocol; gated dead channels are not ranked).
"""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np
import onnx
import pytest

from onnxslim_bn import prune
from tests.graphs import run

ZOO = Path(__file__).resolve().parent.parent / "fixtures" / "zoo"
MANIFEST = json.loads((ZOO / "manifest.json").read_text())
NAMES = list(MANIFEST["models"])
FORMS = ["kept", "folded"]
MIN_COSINE = 0.9999
MAX_REL_DIFF = 5e-5  # of max |original|: float32 through 50-120 layers measured <= 1e-5 where the cut is exact
MAC_SLACK = 0.01
DEAD_SCORE = 1e-6  # dead gammas are exactly 0; folded, their recovered std is ~1e-8


def cases(names: list[str]) -> list:
    return [pytest.param(n, f, id=f"{n}-{f}") for n in names for f in FORMS]


@cache
def samples() -> np.ndarray:
    size = MANIFEST["size"]
    return np.random.default_rng(8).standard_normal((32, 3, size, size)).astype(np.float32)


@cache
def original_output(name: str, form: str) -> np.ndarray:
    return run(onnx.load(str(ZOO / f"{name}.{form}.onnx")), {"input": samples()})[0]


def measure(name: str, form: str, **selection) -> dict:
    """Prune with exact border corrections and no rounding; the numbers the asserts read."""
    result = prune(str(ZOO / f"{name}.{form}.onnx"), round_to=1, min_channels=1, exact_borders=True, verify=False,
                   **selection)
    before, after = original_output(name, form), run(result.model, {"input": samples()})[0]
    assert after.shape == before.shape
    cosine = float((before * after).sum() / (np.linalg.norm(before) * np.linalg.norm(after)))
    return {"original_macs": result.report.before.macs, "kept": result.report.after.macs / result.report.before.macs,
            "cosine": cosine, "rel_diff": float(np.abs(after - before).max() / np.abs(before).max()),
            "removed": result.report.removed_channels}


def check(name: str, got: dict) -> None:
    entry = MANIFEST["models"][name]
    assert got["original_macs"] == entry["macs"], "the tool and the fixture's hook counter count different MACs"
    assert got["cosine"] >= MIN_COSINE, got
    assert got["rel_diff"] <= MAX_REL_DIFF, got
    assert got["kept"] <= entry["exact_ideal_kept"] + MAC_SLACK, (got, entry["exact_ideal_kept"])


@pytest.mark.parametrize("name,form", cases(NAMES))
def test_zoo_dead_channels_go_exactly_down_to_the_structural_ideal(name, form):
    check(name, measure(name, form, threshold=DEAD_SCORE))


@cache
def removable(name: str, form: str) -> tuple[int, int]:
    """(dead channels, those of them that can go exactly, channels the ranking scores), as the tool
    counts them: ``--ratio`` is a fraction of every scored channel (Network Slimming's
    percentile), dead channels behind a squeeze-excitation gate (act(beta) != 0) included."""
    result = prune(str(ZOO / f"{name}.{form}.onnx"), threshold=DEAD_SCORE, round_to=1, min_channels=1, verify=False)
    sel = result.report.selection
    return result.report.chosen_channels + sel["kept_unknown_replacement"], result.report.chosen_channels, sel["ranked"]


@pytest.mark.parametrize("name,form", cases(NAMES))
def test_zoo_ratio_at_the_dead_fraction_matches_the_structural_ideal(name, form):
    """Issue 8's protocol: ``--ratio`` = the dead fraction of the channels the tool ranks. It must
    reach the removable dead channels, not be spent on the gated ones it has to keep."""
    dead, can_go, ranked = removable(name, form)
    assert 0 < can_go <= dead < ranked
    got = measure(name, form, ratio=dead / ranked)
    check(name, got)
    assert got["removed"] >= can_go


def test_zoo_manifest_ideals_are_consistent():
    """The construction's MACs are Torch-Pruning's on the same channels; keeping gated channels costs MACs."""
    for name, entry in MANIFEST["models"].items():
        assert entry["ideal_macs"] < entry["macs"], name
        if "torch_pruning_macs" in entry:
            assert entry["torch_pruning_macs"] == entry["ideal_macs"], name
        assert entry["ideal_kept"] <= entry["exact_ideal_kept"], name
        assert (entry["gated_dead_channels"] > 0) == (entry["exact_ideal_kept"] > entry["ideal_kept"]), name
        assert 0.35 <= entry["dead_fraction"] <= 0.55, name

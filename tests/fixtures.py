"""The committed sparse fixtures (fixtures/train.py) and their held-out data."""

from __future__ import annotations

import json
from functools import cache
from pathlib import Path

import numpy as np

from onnxslim_bn import inspect

FIXTURES = Path(__file__).resolve().parent.parent / "fixtures"
NAMES = ["vgg", "resnet", "densenet", "mobilenetv2"]
DEAD = 1e-3  # the gamma level fixtures/train.py measured as dead


def path(name: str, form: str = "") -> Path:
    return FIXTURES / f"{name}{'.' + form if form else ''}.onnx"


@cache
def heldout() -> tuple[np.ndarray, np.ndarray]:
    data = np.load(FIXTURES / "heldout.npz")
    return data["input"].astype(np.float32), data["label"]


def manifest() -> dict:
    return json.loads((FIXTURES / "manifest.json").read_text())


@cache
def sparsity(name: str, form: str = "") -> float:
    """The fixture's own sparsity level: the fraction of prunable channels scored below DEAD."""
    spaces = [s for s in inspect(str(path(name, form))).spaces if s.blocked is None and s.scores]
    dead = sum(int((np.array(s.scores) < DEAD).sum()) for s in spaces)
    return dead / sum(s.channels for s in spaces)

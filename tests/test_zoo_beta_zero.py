"""The zoo with beta = 0 on its dead channels (issue 16): zero stays zero behind squeeze-excitation
gates, through depthwise and grouped convs, so the tool reaches the structural ideal -- the MACs
Torch-Pruning keeps removing the same channels (``ideal_kept`` in fixtures/zoo/manifest.json) --
and reproduces the original (cosine >= 0.9999, max |diff| <= 5e-5 of the range).

The beta = 0 variants are made here from the zoo's files: a dead channel has gamma = 0 in every
BN of its group (BN kept) or an all-zero weight row (folded), and its beta (or folded bias) is
set to 0.
"""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from onnxslim_bn import prune
from tests.graphs import run
from tests.test_zoo import FORMS, MANIFEST, MAX_REL_DIFF, MIN_COSINE, ZOO, samples

GATED = ["efficientnetb0", "mobilenetv3", "regnetx400mf"]  # SE gates (the first two), grouped convs (RegNetX)
MAC_SLACK = 0.01


def beta_zero(model: onnx.ModelProto) -> onnx.ModelProto:
    model = onnx.ModelProto.FromString(model.SerializeToString())
    inits = {t.name: t for t in model.graph.initializer}

    def zero(name: str, dead: np.ndarray) -> None:
        values = numpy_helper.to_array(inits[name]).copy()
        values[dead] = 0
        inits[name].CopyFrom(numpy_helper.from_array(values, name))

    for node in model.graph.node:
        if node.op_type == "BatchNormalization":
            zero(node.input[2], numpy_helper.to_array(inits[node.input[1]]) == 0)
        elif node.op_type == "Conv" and len(node.input) > 2 and node.input[1] in inits and node.input[2] in inits:
            weight = numpy_helper.to_array(inits[node.input[1]])
            zero(node.input[2], ~weight.reshape(weight.shape[0], -1).any(1))
    return model


@pytest.mark.parametrize("name,form", [pytest.param(n, f, id=f"{n}-{f}") for n in GATED for f in FORMS])
def test_zoo_beta_zero_reaches_the_structural_ideal(name, form):
    model = beta_zero(onnx.load(str(ZOO / f"{name}.{form}.onnx")))
    result = prune(model, threshold=1e-6, round_to=1, min_channels=1, exact_borders=True, verify=False)
    before, after = run(model, {"input": samples()})[0], run(result.model, {"input": samples()})[0]
    cosine = float((before * after).sum() / (np.linalg.norm(before) * np.linalg.norm(after)))
    assert cosine >= MIN_COSINE
    assert float(np.abs(after - before).max() / np.abs(before).max()) <= MAX_REL_DIFF
    kept = result.report.after.macs / result.report.before.macs
    assert kept <= MANIFEST["models"][name]["ideal_kept"] + MAC_SLACK, (kept, MANIFEST["models"][name]["ideal_kept"])
    assert result.report.selection["kept_unknown_replacement"] == 0
    # --ratio at the dead fraction of what the tool ranks (issue 8's protocol) gets there too
    ratio = result.report.chosen_channels / result.report.selection["ranked"]
    again = prune(model, ratio=ratio, round_to=1, min_channels=1, exact_borders=True, verify=False)
    assert again.report.after.macs / again.report.before.macs <= MANIFEST["models"][name]["ideal_kept"] + MAC_SLACK

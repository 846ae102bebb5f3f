"""Importance where the exporter left no BatchNormalization node.

Two forms carry the same BN scale:

- **split** (TF, Paddle): ``Conv -> Mul(s) -> Add(t)`` with ``s = gamma / sqrt(var + eps)``;
- **folded** (``torch.onnx.export`` defaults, onnxsim, onnxslim, tf2onnx): ``W' = W * s``,
  ``b' = (b - mean) * s + beta``.

Neither stores gamma, and ``|s|`` is not gamma (it carries ``1 / sqrt(var)``). But the BN
output of channel c is ``gamma_c * (z_c - mean_c) / sqrt(var_c + eps) + beta_c``, and over
the data the BN was trained on, ``z_c`` has mean ``mean_c`` and variance ``var_c``: the
standard deviation of the BN output *is* ``|gamma_c|``. The folded Conv (or the Mul) computes
exactly that output, so the per-channel standard deviation of its output over calibration
data recovers |gamma| -- on the same scale for every layer, which a global ranking needs.

With ``--data`` the statistics come from the user's inputs (close to training data: the
estimate is close to |gamma|). Without it, seeded standard-normal inputs are used: a dead
channel (gamma ~ 0, so ``W'_c ~ 0``) still has a ~0 deviation whatever the input, so the
channels Network Slimming kills are found either way; the ranking among live channels is
only as good as random inputs resemble the data.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from .analysis import Analysis
from .edits import constant_values
from .rules import RULES

log = logging.getLogger(__name__)


def candidates(analysis: Analysis) -> list[tuple[gs.Node, gs.Tensor, str]]:
    """(scale node, tensor whose statistics score it, kind) for every space without BN scale.

    A producer followed only by a per-channel Mul is the split form; a producer with a
    constant bias and no BN is taken as folded (a folded BN always leaves a bias) -- unless
    the model has a BatchNormalization node that the exporter could have folded into a layer
    of the same op type (the layer's only consumer) and did not: an exporter that kept that
    BN kept them all, and a Conv with a bias there (squeeze-excitation, a head) never had one.
    """
    by_name = {n.name: n for n in analysis.nodes}
    kept_bn = {n.inputs[0].inputs[0].op for n in analysis.nodes
               if n.op == "BatchNormalization" and n.inputs[0].inputs and len(n.inputs[0].outputs) == 1}
    kept_bn |= {by_name[p].op for s in analysis.roots() for p in s.producers
                if _split_scale(by_name[p], analysis) is not None}  # BN written as Mul + Add: not folded either
    found = []
    for space in analysis.roots():
        if space.sources or not space.producers or space.blocked:
            continue
        for name in space.producers + space.coupled:
            node = by_name[name]
            scale = _split_scale(node, analysis)
            if scale is not None:
                found.append((scale, scale.outputs[0], "mul"))
            elif node.op not in kept_bn and RULES[node.op].bias(node) is not None:
                found.append((node, node.outputs[0], "folded"))
    return found


def _split_scale(node: gs.Node, analysis: Analysis) -> gs.Node | None:
    """The per-channel Mul that is a layer's only consumer: the scale of a split BN."""
    users = list(node.outputs[0].outputs)
    if len(users) == 1 and users[0].op == "Mul" and _per_channel_constant(users[0], analysis):
        return users[0]
    return None


def _per_channel_constant(node: gs.Node, analysis: Analysis) -> bool:
    values = [constant_values(t) for t in node.inputs]
    const = next((v for v in values if v is not None), None)
    return const is not None and const.size > 1 and const.size == analysis.static_dims(node.outputs[0], [1])


def add_data_scores(analysis: Analysis, found: list[tuple[gs.Node, gs.Tensor, str]], values: list[np.ndarray]) -> None:
    """Score the spaces of ``found`` (see :func:`candidates`) with the per-channel deviation
    of each scale tensor over the calibration batch (``values``, in the same order)."""
    for (node, tensor, kind), act in zip(found, values):
        act = act.astype(np.float64)
        axes = tuple(a for a in range(act.ndim) if a != 1)
        analysis.add_scores(analysis.layout(tensor), act.std(axis=axes), kind, node)
        # what a removed channel is replaced by: its mean output (beta, for a BN with gamma ~ 0)
        analysis.scale_nodes[node.name] = act.mean(axis=axes)
    log.info("scored %d layers from activation statistics (%s)", len(found), ", ".join(sorted({k for *_, k in found})))

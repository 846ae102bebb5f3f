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

Which layers had a BN folded in is decided per layer (:func:`judge`), never per op type:

1. **A bias is necessary.** A folded BN always leaves a bias ``b' = beta - mean * s``: a constant,
   not all-zero bias input, or the layer's only reader being an ``Add`` of a constant with one
   value per channel, aligned with axis 1 (newer paddle2onnx writes a bias-less Conv then Add;
   tf2onnx a MatMul then Add). That Add is then the layer's scale node. A layer without a bias
   never had a BN. A layer whose only reader is a per-channel ``Mul`` is a split BN (kind "mul").
2. **Model with BN kept somewhere** (a BatchNormalization node, or a split Mul, anywhere): the
   exporter kept BN for some layers, so a biased layer without one is folded only if it looks
   like the folded Conv-BN-Act layers: (a) it reads a feature map with spatial extent (not
   ``[N, C]`` nor ``[N, C, 1, 1]``: classifier Linear layers and squeeze-excitation convs never
   had a BN), and (b) its output (after the bias Add) goes into an activation -- Relu, LeakyRelu,
   PRelu, Clip, HardSwish, Elu, Selu, Celu, Gelu, Mish, Softplus, ThresholdedRelu, or
   ``x * Sigmoid(x)`` / ``x * HardSigmoid(x)``, possibly through Identity / Dropout / Cast or
   through one residual Add whose result is activated (ResNet: conv-bn, Add, Relu); in a QDQ
   model also a QuantizeLinear whose zero point is its type's minimum (it clips at zero: the
   Relu onnxruntime's quantizer absorbed), or through a Q/DQ pair. Sigmoid or
   HardSigmoid alone is a gate or an output squash and does not count. Anything else (a
   prediction conv, a projection conv-bn without activation) is left alone with the reason
   :data:`NEVER_BN`. This is graph evidence only: it can leave a folded projection layer alone
   (safe), it does not score a layer that never had a BN.
3. **Every BN folded** (no BatchNormalization node, no split Mul): a biased layer with spatial
   extent is folded. A biased layer without spatial extent (dense, squeeze-excitation) is
   *tentative*: it is folded only if its calibration statistics are on the scale of the folded
   layers (:func:`settle`): the 90th percentile of its per-channel output deviation lies within
   [ref / 3, ref * 10], ref being the median of that level over the folded layers with spatial
   extent (a folded BN's output deviates by ~|gamma|; a Linear that never had a BN, fed averaged
   features, deviates far less: measured on the zoo fixtures with random inputs 0.09-0.25 x ref
   for classifier Linears, 0.003-0.23 x ref for SE convs; a trained BN1d folded into a Gemm
   6 x ref). Tentative layers that fail are left alone with the reason why.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from ..channels.context import Analysis, Scores
from ..channels.layout import Layout, Segment
from ..channels.reasons import Reason
from ..ir.ids import ObjectMap, ObjectSet
from ..ir.values import constant_values
from ..rules import RULES
from ..rules.roles import ACTIVATIONS, BIAS, GATES, JOINS, NORMALIZATION, PASSING, QUANTIZERS, SCALE

log = logging.getLogger(__name__)


NEVER_BN = "no BatchNorm scale (the exporter kept BN elsewhere; this layer never had one)"
# all-folded models: a layer without spatial extent is folded when its deviation lies within
# [reference / BELOW, reference * ABOVE] of the folded layers with spatial extent (see the module docstring)
BELOW, ABOVE = 3.0, 10.0


@dataclass(frozen=True)
class Verdict:
    """What the graph says about the BN of one layer that has no BatchNormalization node."""

    layer: gs.Node
    scale: gs.Node | None  # the node whose output carries the BN output (None: never had a BN)
    kind: str  # "mul" (split BN) | "folded" | "none"
    biased: bool  # the layer has a bias (a constant bias input or a per-channel Add)
    tentative: bool = False  # folded only if the calibration statistics agree (see module docstring)
    why: str = ""


def keeps_bn(analysis: Analysis) -> bool:
    """Whether the exporter kept BN for some layer: a BatchNormalization node, or a BN split
    into a per-channel Mul (+ Add) after a layer."""
    if any(n.op in NORMALIZATION for n in analysis.nodes):
        return True
    return any(_split_scale(node, analysis) is not None for s in analysis.roots() for node in s.writers + s.coupled)


def judge(layer: gs.Node, analysis: Analysis, kept: bool) -> Verdict:
    """The per-layer rule of the module docstring; ``kept``: :func:`keeps_bn` of the model."""
    scale = _split_scale(layer, analysis)
    if scale is not None:
        return Verdict(layer, scale, "mul", True, why="BN split into Mul + Add")
    add = _bias_add(layer, analysis)
    bias = RULES[layer.op].bias(layer)
    if add is None and (bias is None or not np.any(bias != 0)) and not _all_dead(layer, bias):
        return Verdict(layer, None, "none", False, why="no bias (a folded BN always leaves one)")
    scale = add if add is not None else layer
    if not kept:
        flat = not _spatial(layer, analysis)
        return Verdict(layer, scale, "folded", True, tentative=flat,
                       why="no spatial extent: folded if its statistics agree" if flat else "bias, every BN folded")
    if not _spatial(layer, analysis):
        return Verdict(layer, None, "none", True, why="no spatial extent (a dense or squeeze-excitation layer)")
    if not _activated(scale.outputs[0]):
        return Verdict(layer, None, "none", True, why="not followed by an activation as the folded Conv-BN-Act layers are")
    return Verdict(layer, scale, "folded", True, why="bias, spatial, activation: a folded Conv-BN-Act")


def _all_dead(layer: gs.Node, bias: np.ndarray | None) -> bool:
    """A folded layer whose BN killed every channel with beta = 0: zero weights and a zero bias
    input (its output is 0, whatever the input: every channel is dead, and scores 0)."""
    weight = constant_values(layer.inputs[1])
    return bias is not None and weight is not None and weight.size > 0 and not np.any(weight)


@dataclass(frozen=True)
class Candidates:
    """The layers whose BN scale the calibration statistics recover, and the spaces that never had one."""

    found: list[tuple[gs.Node, gs.Tensor, str]]  # (scale node, tensor whose statistics score it, kind)
    scores: Scores  # the spaces blocked with the reason NEVER_BN (for Analysis.apply)


def candidates(analysis: Analysis) -> Candidates:
    """(scale node, tensor whose statistics score it, kind) for every space without BN scale.

    Each layer writing such a space is judged by :func:`judge` (the rule in the module
    docstring). A space none of whose writers is judged folded, while one of them has a bias
    in a model whose exporter kept BN elsewhere, is blocked with the reason :data:`NEVER_BN`.

    A space scored only by BNs that are one reader among several (DenseNet's BN after a
    concatenation) is such a space too: in the BN-kept export its layer's own BN scores it beside
    them, so the folded export recovers that scale (and its replacement, the mean output) beside them;
    where no layer of it looks folded, their scores stand alone (it is not blocked).
    """
    kept = keeps_bn(analysis)
    shared = ObjectSet(bn for bn, _ in analysis.readers)
    found, blocks = [], []
    for space in analysis.roots():
        own = [s for s in space.sources if s.node is None or s.node not in shared]
        if own or not space.writers or space.blocked:
            continue
        verdicts = [judge(node, analysis, kept) for node in space.writers + space.coupled]
        scored = [v for v in verdicts if v.scale is not None]
        found += [(v.scale, v.scale.outputs[0], v.kind) for v in scored]
        never = [v for v in verdicts if v.biased and v.scale is None]
        if not scored and never and not space.sources:  # reader BNs' scores stand without a layer's own
            v = never[0]
            blocks.append(((Segment(space.id, space.size),), Reason.at("no-scale", v.layer, f"has {NEVER_BN}: {v.why}")))
        for v in verdicts:
            log.debug("%s %s: %s (%s)", v.layer.op, v.layer.name, v.kind, v.why)
    return Candidates(found, Scores(blocks=tuple(blocks)))


def may_be_folded(analysis: Analysis) -> list[gs.Node]:
    """The node whose output carries the BN output (the layer, its bias Add, a split Mul) of every
    layer that may have had a BN folded in: those :func:`judge` finds folded, and those with a
    bias that it leaves alone only for want of the activation or spatial extent of a folded
    Conv-BN-Act (a folded BN always leaves a bias; a Conv-BN-Tanh exported folded is such a layer)."""
    kept = keeps_bn(analysis)
    found = []
    for space in analysis.roots():
        for node in space.writers + space.coupled if not space.blocked else ():
            verdict = judge(node, analysis, kept)
            if verdict.scale is not None or verdict.biased:
                found.append(verdict.scale or _bias_add(node, analysis) or node)
    return found


def settle(analysis: Analysis, found: list[tuple[gs.Node, gs.Tensor, str]], values: list[np.ndarray]
           ) -> tuple[list[tuple[gs.Node, gs.Tensor, str]], list[np.ndarray], list[tuple[Layout, Reason]]]:
    """Keep the tentative folded layers (all-folded model, no spatial extent) whose output
    deviation is on the scale of the structurally folded ones; the spaces of the others are
    blocked (the third item: (layout, reason) pairs).

    The scale of a layer is the 90th percentile of its per-channel deviation (live channels:
    a sparsity-trained layer may be mostly dead); the reference is the median of that over the
    folded layers with spatial extent. Without a reference every tentative layer is kept."""
    kept = keeps_bn(analysis)
    tentative: ObjectMap[gs.Node, Verdict] = ObjectMap()  # scale node -> the verdict on its layer
    for space in analysis.roots():
        for node in space.writers + space.coupled:
            v = judge(node, analysis, kept)
            if v.tentative and v.scale is not None:
                tentative[v.scale] = v
    if not tentative:
        return found, values, []
    levels = [_level(act) for (node, _, _), act in zip(found, values)]
    reference = [lv for (node, _, _), lv in zip(found, levels) if node not in tentative]
    if not reference:
        return found, values, []
    ref = float(np.median(reference))
    keep = [node not in tentative or ref / BELOW <= lv <= ref * ABOVE for (node, _, _), lv in zip(found, levels)]
    out_found = [f for f, k in zip(found, keep) if k]
    survivors = {analysis.find(seg.space) for node, tensor, _ in out_found for seg in analysis.layout(tensor) or ()}
    blocks = []
    for (node, tensor, _), lv, k in zip(found, levels, keep):
        if k:
            continue
        layout = tuple(seg for seg in analysis.layout(tensor) or () if analysis.find(seg.space) not in survivors)
        layer = tentative[node].layer
        blocks.append((layout, Reason.at("no-scale", layer, f"has no BatchNorm scale (its output deviation {lv:.2g} is not "
                                                            f"on the scale of the folded layers' {ref:.2g}; this layer never had one)")))
        log.info("%s %s: deviation %.3g vs folded layers %.3g: never had a BN", layer.op, layer.name, lv, ref)
    return out_found, [a for a, k in zip(values, keep) if k], blocks


def _level(act: np.ndarray) -> float:
    act = act.astype(np.float64)
    std = act.std(axis=tuple(a for a in range(act.ndim) if a != 1))
    return float(np.percentile(std, 90))


def _split_scale(node: gs.Node, analysis: Analysis) -> gs.Node | None:
    """The per-channel Mul that is a layer's only consumer: the scale of a split BN."""
    users = list(node.outputs[0].outputs)
    if len(users) == 1 and users[0].op in SCALE and _channel_constant(users[0], node.outputs[0], analysis):
        return users[0]
    return None


def _bias_add(node: gs.Node, analysis: Analysis) -> gs.Node | None:
    """The per-channel Add of a constant that is a layer's only consumer: its bias, written
    apart (newer paddle2onnx: a bias-less Conv then Add; tf2onnx and others: MatMul then Add)."""
    users = list(node.outputs[0].outputs)
    if len(users) == 1 and users[0].op in BIAS and _channel_constant(users[0], node.outputs[0], analysis):
        return users[0]
    return None


def _channel_constant(node: gs.Node, tensor: gs.Tensor, analysis: Analysis) -> bool:
    """Whether ``node`` combines ``tensor`` with a constant of one value per channel (axis 1):
    shape [C], [C, 1, 1], [1, C, 1, 1], ... aligned with axis 1 -- not a [W]-shaped constant
    that happens to have C entries."""
    others = [t for t in node.inputs if t is not tensor]
    values = constant_values(others[0]) if len(others) == 1 else None
    rank, size = analysis.rank(tensor), analysis.static_dims(tensor, [1])
    if values is None or rank is None or size is None or size < 2 or values.size != size:
        return False
    axis = 1 - (rank - values.ndim)
    return axis >= 0 and values.shape[axis] == size


def _spatial(layer: gs.Node, analysis: Analysis) -> bool:
    """Whether the layer reads a feature map with spatial extent (not [N, C] nor [N, C, 1, 1])."""
    shape = analysis.shape(layer.inputs[0])
    if shape is None:
        return True
    return len(shape) > 2 and any(d != 1 for d in shape[2:])


def _activated(tensor: gs.Tensor, joined: bool = False) -> bool:
    """Whether ``tensor`` goes into an activation, as the output of a folded Conv-BN-Act does:
    an activation op, ``x * Sigmoid(x)`` / ``x * HardSigmoid(x)``, through Identity / Dropout /
    Cast, or through one residual join whose result is activated (ResNet: conv-bn, Add, Relu)."""
    users = list(tensor.outputs)
    if len(users) == 1 and users[0].op in QUANTIZERS and _clips_at_zero(users[0]):
        return True
    if len(users) == 1 and users[0].op in PASSING:
        return _activated(users[0].outputs[0], joined)
    if len(users) == 1 and users[0].op in ACTIVATIONS:
        return True
    if len(users) == 2:
        gate = next((u for u in users if u.op in GATES), None)
        mul = next((u for u in users if u.op in SCALE), None)
        if gate is not None and mul is not None and {id(t) for t in mul.inputs} == {id(tensor), id(gate.outputs[0])}:
            return True
    if not joined and len(users) == 1 and users[0].op in JOINS \
            and not any(isinstance(t, gs.Constant) for t in users[0].inputs):
        return _activated(users[0].outputs[0], True)
    return False


def _clips_at_zero(quantizer: gs.Node) -> bool:
    """A QuantizeLinear whose zero point is its type's minimum (uint8 0, int8 -128): it maps every
    negative value to zero, the ReLU of a folded Conv-BN-ReLU that onnxruntime's QDQ quantizer absorbed."""
    if len(quantizer.inputs) < 3 or not quantizer.inputs[2].name:  # no zero point: uint8 at 0, unless typed otherwise
        return not quantizer.attrs.get("output_dtype")
    zero = constant_values(quantizer.inputs[2])
    if zero is None or not np.issubdtype(zero.dtype, np.integer):
        return False
    return bool(np.all(zero == np.iinfo(zero.dtype).min))


def add_data_scores(analysis: Analysis, found: list[tuple[gs.Node, gs.Tensor, str]], values: list[np.ndarray]) -> Scores:
    """The scores of the spaces of ``found`` (see :func:`candidates`): the per-channel deviation
    of each scale tensor over the calibration batch (``values``, in the same order)."""
    found, values, blocks = settle(analysis, found, values)  # tentative layers: folded only if their statistics agree
    added, means = [], []
    for (node, tensor, kind), act in zip(found, values):
        act = act.astype(np.float64)
        axes = tuple(a for a in range(act.ndim) if a != 1)
        added.append((analysis.layout(tensor), act.std(axis=axes), kind, node))
        # what a removed channel is replaced by: its mean output (beta, for a BN with gamma ~ 0)
        means.append((node, act.mean(axis=axes)))
    log.info("scored %d layers from activation statistics (%s)", len(found), ", ".join(sorted({k for *_, k in found})))
    return Scores(added=tuple(added), blocks=tuple(blocks), scale_means=tuple(means))

"""Importance from data: what removing a channel costs at the layers that read it.

For models trained without the L1 penalty nothing is dead, and |gamma| ranks live channels
poorly (the next BN renormalises: a layer can carry its signal on small gammas). With a few
hundred calibration samples the cost of a channel can be measured where it matters, at its
consumers. A removed channel is replaced by its mean (folded into the consumer's bias), so
what is lost at consumer K is the channel's variation through K's weights:

    cost_K(c) = sum_o Var(x_c) * W_K[o, c]^2 / Var(y_K,o)  /  n_o

-- the channel's share of the variance of each output of K, averaged over the outputs
(cross-channel correlations ignored), a relative figure, so that channels of different layers
compare in one global ranking. Each output counts as one whatever its scale: a BN kept after K
and the same BN folded into K's weights scale an output and its variance alike (for a kept BN
its scale is applied first, so that an output a zero gamma made constant counts for nothing in
either form), so the BN-kept and the folded export of one model rank alike (weighting the outputs by their variance, as
``sum_o W^2 Var(x) / sum_o Var(y)`` did, gave the two exports a per-layer factor of up to 1.17
and removed-channel overlaps down to 0.50 on the ordinary ResNet fixture). A channel read by
several consumers (a residual group, a concatenation) sums its costs.

The replacement of a channel at a consumer becomes its measured mean there, also where the
rules prove no constant (a gate, a Pad of another value: :mod:`.replacement`); with gamma
importance such channels stay unremovable.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx

from ..ir import runtime
from ..passes import calibrate
from ..channels.context import Analysis
from ..channels.spaces import ScoreSource
from ..ir.values import constant_values
from ..ir.weights import axes

log = logging.getLogger(__name__)


def _output_scale(node) -> np.ndarray | None:
    """The per-output scale ``gamma / sqrt(var + eps)`` of a BatchNormalization that is the
    consumer's only reader, or None. A folded export carries it in the consumer's weights; the
    BN-kept export applies it after: :func:`data_importance` applies it to the kept one's
    weights and output variances, so that both see the same outputs (a BN with gamma 0 makes
    its output constant in either)."""
    users = list(node.outputs[0].outputs)
    if len(users) != 1 or users[0].op != "BatchNormalization" or users[0].inputs[0] is not node.outputs[0]:
        return None
    gamma, var = constant_values(users[0].inputs[1]), constant_values(users[0].inputs[4])
    if gamma is None or var is None or gamma.shape != var.shape or gamma.ndim != 1:
        return None
    return gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + users[0].attrs.get("epsilon", 1e-5))


def _output_weights(var: np.ndarray) -> np.ndarray:
    """``1 / Var(y_o)`` per output of a consumer (0 for outputs that do not vary): each output's
    variance counts as one, whatever scale the export left on it -- a BN kept after the
    consumer, folded into its weights, or split into a Mul."""
    var = np.asarray(var, np.float64)
    floor = 1e-12 * float(var.max()) if var.size and var.max() > 0 else np.inf
    return np.where(var > floor, 1.0 / np.maximum(var, floor if np.isfinite(floor) else 1.0), 0.0)


def _weight_energy(node, entries: int, out_weight: np.ndarray | None = None) -> np.ndarray | None:
    """Per input entry of a consumer: the sum of its squared weights over the outputs (each
    output weighted by ``out_weight`` when given)."""
    weight = constant_values(node.inputs[1])
    if weight is None:
        return None
    w2 = weight.astype(np.float64) ** 2
    if out_weight is not None:  # the output axis of the weight: Conv [C_out, ...], Gemm / MatMul [K, N] or [N, K]
        found = axes(node)  # a ConvTranspose's output axis holds C_out / group: none for all outputs
        axis = found.out_axis if found.out_axis == 0 or (not found.spatial and w2.ndim == 2) else None
        if axis is None or w2.shape[axis] != len(out_weight):
            return None
        w2 = w2 * out_weight.reshape([-1 if a == axis else 1 for a in range(w2.ndim)])
    if node.op in ("Gemm", "MatMul"):
        trans = node.op == "Gemm" and node.attrs.get("transB", 0)
        energy = w2.sum(0) if trans else w2.sum(1)
        return energy * (node.attrs.get("alpha", 1.0) ** 2 if node.op == "Gemm" else 1.0)
    if node.op == "ConvTranspose":  # [C_in, C_out / g, k...]
        return w2.reshape(w2.shape[0], -1).sum(1)
    group = node.attrs.get("group", 1)  # Conv [C_out, C_in / g, k...]: input c feeds its group's outputs
    per_in, per_out = w2.shape[1], w2.shape[0] // group
    taps = w2.reshape(w2.shape[0], per_in, -1).sum(2)
    energy = np.concatenate([taps[j * per_out:(j + 1) * per_out].sum(0) for j in range(group)])
    return energy if len(energy) == entries else None


def data_importance(analysis: Analysis, model: onnx.ModelProto, feeds: dict[str, np.ndarray]) -> int:
    """Score every ranked space by the cost its channels cause at their consumers, measured on
    ``feeds``; record each consumer input's channel means as the replacement values. Returns
    how many consumers were measured."""
    consumers = [c for c in analysis.consumers if analysis.layout(c.node.inputs[0]) is not None]
    tensors = [c.node.inputs[0].name for c in consumers] + [c.node.outputs[0].name for c in consumers]
    stats = calibrate.calibrate(model, feeds, moments=list(dict.fromkeys(tensors)), what="the calibration").moments
    totals: dict[int, np.ndarray] = {}
    measured = 0
    for consumer in consumers:
        node = consumer.node
        layout = analysis.layout(node.inputs[0])
        x, y = stats[node.inputs[0].name], stats[node.outputs[0].name]
        # each output counts as one (its variance's share, not its size): the same ranking whatever
        # per-output scale the export left (a BN kept after the layer, folded into it, split into a Mul)
        # (the outputs of a BN kept after the layer: its scale applied, as folded into the weights)
        per_output = node.op == "Conv" or analysis.rank(node.outputs[0]) == 2
        bn = _output_scale(node) if per_output else None
        bn = bn if bn is not None and len(bn) == len(y.var) else None
        var = y.var if bn is None else y.var * bn ** 2
        weight = _output_weights(var) if per_output else None
        energy = _weight_energy(node, len(x.var), None if weight is None else weight * (1.0 if bn is None else bn ** 2))
        if energy is None:  # a weight layout without one output axis (ConvTranspose): outputs pooled
            weight, var, energy = None, y.var, _weight_energy(node, len(x.var))
        if energy is None or len(energy) != len(x.var):
            continue
        scale = float((var * (1.0 if weight is None else weight)).sum())
        cost = x.var * energy / scale if scale > 0 else np.zeros_like(x.var)
        repeat = np.concatenate([np.full(s.size, s.repeat) for s in layout])
        per_channel = np.add.reduceat(cost, np.concatenate([[0], np.cumsum(repeat)[:-1]]))
        means = np.add.reduceat(x.mean, np.concatenate([[0], np.cumsum(repeat)[:-1]])) / repeat
        analysis.input_means[node.inputs[0].name] = means
        roots, index = analysis.channel_ids(layout)
        for root in np.unique(roots):
            space = analysis.spaces[int(root)]
            total = totals.setdefault(int(root), np.zeros(space.size))
            np.add.at(total, index[roots == root], per_channel[roots == root])
        measured += 1
    for space in analysis.prunable():
        if space.sources and space.id in totals:
            space.sources = [ScoreSource("consumers", "data", totals[space.id])]
    log.info("data importance: %d consumers measured on %d samples", measured, runtime.count(feeds))
    return measured


PLACEHOLDER = "unscaled"  # the source node of a space opened by :func:`open_unscaled`, until measured


def open_unscaled(analysis: Analysis) -> list[int]:
    """With data, the spaces left alone only for want of a BN scale (a layer that never had a BN,
    a re-parameterised conv) can be ranked like any other: their channels' cost is measured at
    the consumers. Returns the opened spaces; :func:`data_importance` scores them, and those it
    could not measure are blocked again."""
    opened = []
    for space in analysis.roots():
        if not space.producers or space.sources:
            continue
        if space.blocked and not all("has no BatchNorm scale" in reason for reason in space.blocked):
            continue
        space.blocked = []
        space.sources = [ScoreSource(PLACEHOLDER, "data", np.zeros(space.size))]
        opened.append(space.id)
    return opened


def close_unmeasured(analysis: Analysis, opened: list[int]) -> int:
    """Block again the opened spaces that no consumer measured (their placeholder scores are
    zero: they would go first). Returns how many stay open."""
    left = 0
    for root in opened:
        space = analysis.spaces[root]
        if any(s.node == PLACEHOLDER for s in space.sources):
            space.sources = []
            space.blocked.append("no BatchNorm scale, and no consumer of its channels could be measured on the data")
        else:
            left += 1
    return left


"""Applying a plan to the graph: compensate, slice, clean up."""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from .analysis import Analysis
from .edits import add_after
from .plan import Plan
from .rules import RULES, Compensation

log = logging.getLogger(__name__)


@dataclass
class SurgeryStats:
    compensated_layers: int = 0  # consumers whose bias absorbed removed channels' constants
    approximate_layers: int = 0  # of those, padded convs: exact inside, approximate at borders
    uncompensated_channels: int = 0  # removed channels whose constant value is not known


def dead_values(analysis: Analysis) -> dict[str, np.ndarray]:
    """The constant each removed channel carries, per channel-carrying tensor (NaN: unknown).

    A channel is removed because every BN scale that writes it is ~0; with the scale taken as
    0, the BN outputs beta, and the rules carry that constant through activations, pooling,
    joins and concatenations to the next layer that consumes it.
    """
    dead: dict[str, np.ndarray] = {}
    for node in analysis.nodes:
        if not any(t.name in analysis.layouts for t in node.outputs):
            continue
        rule = RULES[node.op]
        values = rule.dead_values(node, analysis, [dead.get(t.name) for t in node.inputs])
        for tensor, value in zip(node.outputs, values):
            if value is not None and tensor.name in analysis.layouts:
                dead[tensor.name] = value
    return dead


def apply(analysis: Analysis, plan: Plan, exact_borders: bool = False) -> SurgeryStats:
    """Edit ``analysis.graph`` in place so that it computes with the kept channels only.

    With ``exact_borders``, a padded Conv with static sizes also gets an ``Add`` of the border
    correction, so that removed constant channels are compensated exactly everywhere."""
    stats = SurgeryStats()
    dead = dead_values(analysis)
    pending: list[tuple[gs.Node, Compensation]] = []
    for consumer in analysis.consumers:  # reads the original weights: before any slicing
        node = consumer.node
        removed = plan.removed_mask(analysis.layout(node.inputs[0]))
        if not removed.any():
            continue
        values = dead.get(node.inputs[0].name, np.full(removed.shape, np.nan))
        comp = consumer.rule.compensate(node, analysis, values, removed)
        stats.uncompensated_channels += comp.missing
        if np.any(comp.delta != 0):
            pending.append((node, comp))
    for edit in analysis.edits:
        edit.apply(plan.keep_index)
    for node, comp in pending:
        out = analysis.layout(node.outputs[0])
        kept = slice(None) if out is None else plan.keep_index(out)
        RULES[node.op].add_bias(node, comp.delta[kept], analysis.graph)
        stats.compensated_layers += 1
        border = comp.border() if exact_borders and comp.border is not None else None
        if border is not None:
            add_after(analysis.graph, node, border[kept][None].astype(np.float32), "border")
        stats.approximate_layers += not comp.exact and border is None
    graph = analysis.graph
    ends = {t.name for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():  # shapes inside the graph are stale now
        if isinstance(tensor, gs.Variable) and tensor.name not in ends:
            tensor.shape = None
    graph.cleanup().toposort()
    log.info("compensated %d layers (%d approximate at borders), %d channels without a known constant",
             stats.compensated_layers, stats.approximate_layers, stats.uncompensated_channels)
    return stats

"""Applying a plan to the graph: compensate, slice, clean up.

The surgery edits the analysed graph itself, inside :func:`onnxslim_bn.ir.values.restored`:
the checkpoint keeps references to every node's and tensor's fields (a few hundred kilobytes
at ResNet-50 size, no weight copied) and puts them back when the attempt is exported and
checked, so the analysis -- whose edits and consumers hold those very nodes -- serves the
next attempt unchanged. A copy of the graph would need every node the analysis holds mapped
to its copy, and a log of each change would need every writer (rules, fold, interface,
onnx-graphsurgeon's cleanup) to record into it; the checkpoint needs neither.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..ir.values import add_after, replace_constant
from ..rules import RULES, Compensation
from .replacement import dead_values
from .select import Plan, carriers

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class SurgeryStats:
    compensated_layers: int = 0  # consumers whose bias absorbed removed channels' constants
    approximate_layers: int = 0  # of those, consumers exact inside and approximate at the borders
    uncompensated_channels: int = 0  # removed channels whose constant value is not known (0: the plan keeps them)
    # consumer node -> largest |error| its border approximation adds to its output (None: dynamic
    # image size, not measured); empty when every compensation is exact
    approximate: dict[str, float | None] = field(default_factory=dict)
    border_maps: int = 0  # --exact-borders: border corrections added as constant maps
    carried: int = 0  # consumers exact at the borders through a kept constant channel (no bias change)


def apply(analysis: Analysis, plan: Plan, exact_borders: bool = False) -> SurgeryStats:
    """Edit ``analysis.graph`` so that it computes with the kept channels only (inside
    :func:`onnxslim_bn.ir.values.restored`: the next attempt needs the graph as analysed).

    Every consumer of removed channels absorbs their constants (:mod:`.replacement`) into its
    bias. Where zero padding (or a ConvTranspose's overlap) makes the constant's contribution
    vary near the border, the bias is exact inside only. With ``exact_borders`` and static sizes
    an ``Add`` of the measured border map makes it exact everywhere. Without it, a Conv that keeps
    a dead channel of the same tensor with a non-zero constant (:mod:`.select.carriers`) moves
    the removed constants onto that channel's weights instead: the padding meets it as it met
    them, so the layer is exact at every image size with no op added; where none is kept, the
    layer and the size of its approximation are recorded."""
    dead = plan.dead or dead_values(analysis)  # computed once by the selection
    pending: list[tuple[gs.Node, Compensation]] = []
    uncompensated = compensated = border_maps = approximate_layers = carried = 0
    approximate: dict[str, float | None] = {}
    for consumer in analysis.consumers:  # reads the original weights: before any slicing
        node = consumer.node
        removed = plan.removed_mask(analysis.layout(node.inputs[0]))
        if not removed.any():
            continue
        values = dead.get(node.inputs[0].name, np.full(removed.shape, np.nan))
        comp = consumer.rule.compensate(node, analysis, values, removed)
        uncompensated += comp.missing
        if not comp.exact and not exact_borders and not analysis.input_means:  # means are not constants
            weight = consumer.rule.carry(node, values, removed, carriers(plan, analysis, node.inputs[0].name, values, removed))
            if weight is not None:
                replace_constant(node, 1, weight)
                carried += 1
                continue
        if np.any(comp.delta != 0) or not comp.exact:
            pending.append((node, comp))
    for edit in analysis.edits:
        edit.apply(plan.keep_index)
    for node, comp in pending:
        out = analysis.layout(node.outputs[0])
        kept = slice(None) if out is None else plan.keep_index(out)
        if np.any(comp.delta != 0):
            RULES[node.op].add_bias(node, comp.delta[kept], analysis.graph)
            compensated += 1
        if comp.exact:
            continue
        border = comp.border() if comp.border is not None else None
        if border is not None and not np.any(np.abs(border) > 0):
            continue  # the constants' taps never meet the padding (they were zero there)
        if exact_borders and border is not None:
            add_after(analysis.graph, node, border[kept][None].astype(node.inputs[1].dtype), "border")
            border_maps += 1
            continue
        approximate_layers += 1
        approximate[node.name] = None if border is None else float(np.abs(border).max())
    stats = SurgeryStats(compensated, approximate_layers, uncompensated, approximate, border_maps, carried)
    graph = analysis.graph
    ends = {t.name for t in graph.inputs + graph.outputs}
    for tensor in graph.tensors().values():  # shapes inside the graph are stale now
        if isinstance(tensor, gs.Variable) and tensor.name not in ends:
            tensor.shape = None
    graph.cleanup().toposort()
    log.info("compensated %d layers (%d approximate at borders, %d border maps, %d carried by a kept constant "
             "channel), %d channels without a known constant", stats.compensated_layers, stats.approximate_layers,
             stats.border_maps, stats.carried, stats.uncompensated_channels)
    return stats


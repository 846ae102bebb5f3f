"""The analysis pass: walk the graph once with the op rules (twice where reader BNs need it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..channels.layout import Segment, channels
from ..channels.reasons import Reason
from ..ir.ids import ObjectMap, ObjectSet
from ..rules import RULES
from .importance import candidates, may_be_folded
from .replacement import dead_values, unsafe_channels


def analyze(graph: gs.Graph, shapes: dict[str, list[int | str | None]],
            protect: Callable[[str], bool] | None = None, measured: bool = False) -> Analysis:
    """Walk ``graph`` in topological order and apply the rule for every node.

    A BN that is one reader among several of a tensor first scores the tensor's space, like the
    others (a channel goes when every BN reading it lets it die: exact, and no copy is added).
    Where some other reader sees the raw channels (a shortcut, a downsample conv: the replacement
    is unknown there, see :mod:`.replacement`), that would keep them all; the walk is then done
    again with those BNs scoring only their branch (:class:`Selector`).

    The replacement is judged as it will be once the scales are recovered: a layer whose BN the
    exporter folded in (:func:`.importance.candidates`) gets its mean output as the replacement,
    as a kept BN gives its beta -- so the BN-kept and the folded export of one model make the
    same choice (deciding on the folded layers' unknown values made a DenseNet reader BN after a
    concatenation select its branch in the folded export only, and score differently).
    ``measured`` (importance from data): every layer with a bias counts as one that may have had
    a BN folded in (:func:`.importance.may_be_folded`), whatever activation follows it: the
    BN-kept export of a Conv-BN-Tanh gives beta, so the folded one must count as known too, or
    its reader BN alone would score its branch apart. A layer without a bias never had a BN in
    either export, and a raw reader of it still makes the BN score its branch alone
    (pre-activation ResNets: the shortcut).
    """
    first = _walk(graph, shapes, protect, ObjectSet())
    if not first.readers:
        return first
    unsafe = unsafe_channels(first, _recovered_dead_values(first, measured)).mask
    raw = ObjectSet(bn for bn, source in first.readers  # a raw reader, or a tensor nothing else may prune
                    if any(unsafe.get(first.find(seg.space), np.zeros(1, bool)).any() or first.space(seg.space).blocked
                           for seg in source))
    return _walk(graph, shapes, protect, raw) if raw else first


def _recovered_dead_values(analysis: Analysis, measured: bool) -> dict[str, np.ndarray]:
    """:func:`.replacement.dead_values` with every folded layer's replacement known (a stand-in
    for the mean output that scale recovery, or the data, measures later); with ``measured``,
    every layer that may have had a BN folded in. The analysis is left as it was."""
    stand_ins = ObjectMap()
    for scale in may_be_folded(analysis) if measured else [found[0] for found in candidates(analysis).found]:
        layout = analysis.layout(scale.outputs[0])
        if layout is not None:
            stand_ins[scale] = np.zeros(channels(layout))
    before, analysis.scale_nodes = analysis.scale_nodes, stand_ins
    try:
        return dead_values(analysis)
    finally:
        analysis.scale_nodes = before


def _walk(graph: gs.Graph, shapes: dict[str, list[int | str | None]], protect: Callable[[str], bool] | None,
          selecting: ObjectSet[gs.Node]) -> Analysis:
    ctx = Analysis(graph, shapes)
    ctx.selecting = selecting
    graph.toposort()
    ctx.nodes = list(graph.nodes)
    for node in ctx.nodes:
        carrying = [t for t in node.inputs if t.name in ctx.layouts]
        for sub in node.subgraphs(recursive=True):  # If / Loop bodies read outer tensors implicitly
            for name in sub.tensors():
                if name in ctx.layouts:
                    ctx.block(ctx.layouts[name], Reason.at("subgraph", node, f"reads '{name}' inside its subgraph"))
        rule = RULES.get(node.op) if node.domain in ("", "ai.onnx", None) else None
        if rule is None:
            if carrying:
                for t in carrying:
                    ctx.block(ctx.layout(t), Reason.at("unknown-op", node, "is not an op onnx-bnslim can follow"))
            continue
        rule.analyze(node, ctx)
    for out in graph.outputs:
        ctx.block(ctx.layout(out), Reason("graph-output", None, f"the channels reach the graph output '{out.name}'"))
    if protect is not None:
        for space in ctx.roots():
            hit = [p for p in space.producers if protect(p)]
            if hit:
                ctx.block((Segment(space.id, space.size),), Reason("protected", None, f"{hit[0]} is protected by --keep"))
    return ctx

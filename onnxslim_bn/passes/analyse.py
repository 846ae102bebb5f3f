"""The analysis pass: walk the graph once with the op rules (twice where reader BNs need it)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..channels.layout import Segment
from ..channels.reasons import Reason
from ..ir.ids import ObjectSet
from ..rules import RULES
from .replacement import dead_values, unsafe_channels


def analyze(graph: gs.Graph, shapes: dict[str, list[int | str | None]],
            protect: Callable[[str], bool] | None = None) -> Analysis:
    """Walk ``graph`` in topological order and apply the rule for every node.

    A BN that is one reader among several of a tensor first scores the tensor's space, like the
    others (a channel goes when every BN reading it lets it die: exact, and no copy is added).
    Where some other reader sees the raw channels (a shortcut, a downsample conv: the replacement
    is unknown there, see :mod:`.replacement`), that would keep them all; the walk is then done
    again with those BNs scoring only their branch (:class:`Selector`)."""
    first = _walk(graph, shapes, protect, ObjectSet())
    if not first.readers:
        return first
    unsafe = unsafe_channels(first, dead_values(first))
    raw = ObjectSet(bn for bn, source in first.readers  # a raw reader, or a tensor nothing else may prune
                    if any(unsafe.mask.get(first.find(seg.space), np.zeros(1, bool)).any() or first.space(seg.space).blocked
                           for seg in source))
    return _walk(graph, shapes, protect, raw) if raw else first


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

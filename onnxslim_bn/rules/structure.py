"""Ops that move, pool, pad or reshape tensors without mixing channels."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..channels.edits import SetShapeEntry, SetSliceRange, SetSplitSizes
from ..channels.layout import Layout, Segment, channels, cut, width
from ..channels.reasons import Reason
from ..ir.values import constant_values
from .base import Rule, attr, block_inputs, carrying, is_channel_axis, opset, register, used


def _axes(node: gs.Node, ctx: Analysis, input_index: int, since: int) -> list[int] | None:
    """An ``axes`` list that moved from an attribute to an input at opset ``since``."""
    if opset(ctx) < since:
        axes = attr(node, "axes")
        return None if axes is None else list(axes)
    if len(node.inputs) <= input_index or not node.inputs[input_index].name:
        return None
    values = constant_values(node.inputs[input_index])
    return None if values is None else [int(v) for v in values.reshape(-1)]


def _norm(axes: list[int], rank: int) -> list[int]:
    """Non-negative axes, in the given order (pads, scales and slice bounds follow that order)."""
    return [a + rank if a < 0 else a for a in axes]


class _SameLayout(Rule):
    """Base for ops whose first output carries the first input's channels unchanged."""

    def check(self, node: gs.Node, ctx: Analysis) -> Reason | None:
        """A reason to block, or None when the op keeps the channel axis intact."""
        return None

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        why = self.check(node, ctx)
        if why is not None:  # a blocked op passes no layout on: what it writes may not be these channels
            ctx.block(layout, why)
            return
        ctx.set_layout(node.outputs[0], layout)

    def dead_values(self, node, ctx, inputs):
        return [inputs[0]] + [None] * (len(node.outputs) - 1)


@register
class PoolRule(_SameLayout):
    """Pooling works per channel; MaxPool's optional indices output must be unused.

    A constant stays the same constant through max and average pools -- except an average
    that counts the padding (``count_include_pad``, or partial windows of ``ceil_mode``), where
    it shrinks near the border. Lp pools scale it by the window size to the power 1/p, and
    padding changes the window near the border: those are constant only for a zero channel."""

    ops = ("MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "GlobalLpPool")

    def check(self, node, ctx):
        if any(used(t, ctx) for t in node.outputs[1:]):
            return Reason.at("channel-indices", node, "returns indices that depend on the channel count")
        return None

    def dead_values(self, node, ctx, inputs):
        value = inputs[0]
        rest = [None] * (len(node.outputs) - 1)
        if value is None or node.op in ("MaxPool", "GlobalMaxPool", "GlobalAveragePool"):
            return [value] + rest
        padded = any(attr(node, "pads", [0])) or attr(node, "auto_pad", "NOTSET") not in ("NOTSET", "VALID")
        zero_only = np.where(value == 0, 0.0, np.nan)
        if node.op == "AveragePool":
            uneven = attr(node, "count_include_pad", 0) and (padded or attr(node, "ceil_mode", 0))
            return [zero_only if uneven else value] + rest
        p = attr(node, "p", 2)
        if node.op == "LpPool":
            window = int(np.prod(attr(node, "kernel_shape", [1])))
            return [zero_only if padded or attr(node, "ceil_mode", 0) else np.abs(value) * window ** (1.0 / p)] + rest
        rank = ctx.rank(node.inputs[0])  # GlobalLpPool: over the whole (static) image
        window = None if rank is None else ctx.static_dims(node.inputs[0], range(2, rank))
        return [zero_only if window is None else np.abs(value) * window ** (1.0 / p)] + rest


@register
class ReduceRule(_SameLayout):
    """ReduceMean / Max / Min over spatial axes (axes: attribute before opset 18, input from 18)."""

    ops = ("ReduceMean", "ReduceMax", "ReduceMin")

    def check(self, node, ctx):
        rank = ctx.rank(node.inputs[0])
        axes = _axes(node, ctx, 1, 18)
        if axes is None or rank is None:
            return Reason.at("reduce-channel-axis", node, "reduces over all axes or axes it does not spell out")
        if {0, 1} & set(_norm(axes, rank)):
            return Reason.at("reduce-channel-axis", node, "reduces over the batch or channel axis")
        return None


@register
class PadRule(_SameLayout):
    """Pad that leaves the channel axis alone (pads: attribute before opset 11, input from 11)."""

    ops = ("Pad",)

    def check(self, node, ctx):
        rank = ctx.rank(node.inputs[0])
        pads = attr(node, "pads") if opset(ctx) < 11 else constant_values(node.inputs[1])
        if pads is None or rank is None:
            return Reason.at("computed-parameter", node, "has computed pads")
        pads = np.asarray(pads).reshape(-1)
        axes = _axes(node, ctx, 3, 18) if opset(ctx) >= 18 else None
        axes = list(range(rank)) if axes is None else _norm(axes, rank)
        if 1 in axes:
            i = axes.index(1)
            if pads[i] != 0 or pads[i + len(axes)] != 0:
                return Reason.at("pad-channel-axis", node, "pads the channel axis")
        return None

    def dead_values(self, node, ctx, inputs):
        """Edge, reflect and wrap padding repeat a constant; constant padding writes its own
        value, so the channel stays constant only when that value is the channel's."""
        value = inputs[0]
        if value is None or attr(node, "mode", "constant") != "constant":
            return [value]
        pads = attr(node, "pads") if opset(ctx) < 11 else constant_values(node.inputs[1])
        if not np.any(np.asarray(pads)):
            return [value]
        if opset(ctx) < 11:
            fill = float(attr(node, "value", 0.0))
        elif len(node.inputs) > 2 and node.inputs[2].name:
            given = constant_values(node.inputs[2])
            fill = None if given is None else float(given.reshape(-1)[0])
        else:
            fill = 0.0
        if fill is None:
            return [np.full(len(value), np.nan)]
        return [np.where(value == fill, value, np.nan)]


@register
class ResizeRule(Rule):
    """Resize / Upsample with a scale of 1 on the channel axis; explicit ``sizes`` are rewritten."""

    ops = ("Resize", "Upsample")

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        why = self._check(node, ctx, layout)
        if why is not None:
            ctx.block(layout, why)
            return
        ctx.set_layout(node.outputs[0], layout)

    def _check(self, node: gs.Node, ctx: Analysis, layout) -> Reason | None:
        """A reason to block, or None (recording the ``sizes`` rewrite when there is one)."""
        rank = ctx.rank(node.inputs[0])
        if rank is None:
            return Reason.at("unknown-shape", node, "has an input of unknown rank")
        axes = attr(node, "axes")
        axes = list(range(rank)) if axes is None else _norm(list(axes), rank)
        if 1 not in axes:
            return None
        channel = axes.index(1)
        scales = attr(node, "scales") if node.op == "Upsample" and opset(ctx) < 9 else None
        scale_index = 2 if node.op == "Resize" and opset(ctx) >= 11 else 1
        if scales is None and len(node.inputs) > scale_index and node.inputs[scale_index].name:
            scales = constant_values(node.inputs[scale_index])
            if scales is None:
                return Reason.at("computed-parameter", node, "has computed scales")
        if scales is not None and len(scales) and float(np.asarray(scales).reshape(-1)[channel]) != 1.0:
            return Reason.at("resize-channel-axis", node, "scales the channel axis")
        if node.op == "Resize" and len(node.inputs) > 3 and node.inputs[3].name:
            sizes = constant_values(node.inputs[3])
            if sizes is None:
                return Reason.at("computed-parameter", node, "has computed sizes")
            ctx.edit(SetShapeEntry(node, 3, channel, layout))
        return None

    def dead_values(self, node, ctx, inputs):
        """Interpolation weights sum to one: a constant stays itself -- except where
        ``tf_crop_and_resize`` samples outside the image and writes ``extrapolation_value``."""
        value = inputs[0]
        if value is None or attr(node, "coordinate_transformation_mode", "half_pixel") != "tf_crop_and_resize":
            return [value]
        return [np.where(value == attr(node, "extrapolation_value", 0.0), value, np.nan)]


@register
class ConcatRule(Rule):
    """Concat on the channel axis lays the inputs' spaces end to end (DenseNet, UNet skips)."""

    ops = ("Concat",)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        flowing = carrying(node, ctx)
        if not flowing:
            return
        if not is_channel_axis(attr(node, "axis", 1), ctx.rank(node.outputs[0])):
            block_inputs(node, ctx, "concat-axis", "concatenates along an axis other than the channels")
            return
        parts: list[Segment] = []
        for tensor in node.inputs:
            layout = ctx.layout(tensor)
            if layout is None:
                size = ctx.static_dims(tensor, [1])
                if size is None:
                    block_inputs(node, ctx, "unknown-shape", f"concatenates '{tensor.name}' of unknown channel count")
                    return
                layout = ctx.opaque(size, Reason.at("concat-foreign-input", node,
                                                    f"mixes in '{tensor.name}', which is not a pruneable layer output"))
            parts.extend(layout)
        if any(s.repeat != 1 for s in parts):
            block_inputs(node, ctx, "flattened-features", "concatenates flattened features")
            return
        ctx.set_layout(node.outputs[0], tuple(parts))

    def dead_values(self, node, ctx, inputs):
        return [np.concatenate([
            d if d is not None else np.full(ctx.static_dims(t, [1]) or 0, np.nan)
            for t, d in zip(node.inputs, inputs)
        ])]


def _flattened(layout: Layout, spatial: int) -> Layout:
    return tuple(Segment(s.space, s.size, s.repeat * spatial, s.offset) for s in layout)


@register
class FlattenRule(Rule):
    """Flatten at axis 1: [N, C, H, W] -> [N, C*H*W]; each channel then owns H*W features."""

    ops = ("Flatten",)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        rank = ctx.rank(node.inputs[0])
        spatial = None if rank is None else ctx.static_dims(node.inputs[0], range(2, rank))
        if not is_channel_axis(attr(node, "axis", 1), rank) or spatial is None:
            ctx.block(layout, Reason.at("flatten-unsupported", node,
                                        "does not keep the channels on axis 1 with a static spatial size"))
            return
        ctx.set_layout(node.outputs[0], _flattened(layout, spatial))

    def dead_values(self, node, ctx, inputs):
        return [inputs[0]]


@register
class ReshapeRule(Rule):
    """Reshape [N, C, H, W] -> [N, C*H*W] (a classifier head) or [N, C] -> [N, C, 1, 1]
    (squeeze-excitation as tf2onnx writes it). A target that spells the width out is rewritten;
    every other reshape changes the channel axis and blocks."""

    ops = ("Reshape",)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        in_shape, out_shape = ctx.shape(node.inputs[0]), ctx.shape(node.outputs[0])
        target = constant_values(node.inputs[1])
        if in_shape is None or out_shape is None:
            ctx.block(layout, Reason.at("unknown-shape", node, "has shapes shape inference could not find"))
            return
        features = width(layout)
        if len(out_shape) == 2 and len(in_shape) >= 2:  # flatten into [N, features]
            spatial = ctx.static_dims(node.inputs[0], range(2, len(in_shape)))
            entry = _feature_entry(node, in_shape[0])
            if spatial is not None and entry is not None:
                holder, index, position, value, batch_given = entry
                out = _flattened(layout, spatial)
                if value == features * spatial:  # the width is spelled out: rewrite it
                    ctx.edit(SetShapeEntry(holder, index, position, out))
                if value == features * spatial or (value == -1 and batch_given):
                    ctx.set_layout(node.outputs[0], out)
                    return
        elif len(in_shape) == 2 and len(out_shape) > 2 and all(d == 1 for d in out_shape[2:]) \
                and target is not None and len(target) == len(out_shape) and target[1] == features \
                and all(s.repeat == 1 for s in layout):
            ctx.edit(SetShapeEntry(node, 1, 1, layout))
            ctx.set_layout(node.outputs[0], layout)
            return
        ctx.block(layout, Reason.at("reshape-channel-axis", node, f"changes the channel axis ({in_shape} -> {out_shape})"))

    def dead_values(self, node, ctx, inputs):
        return [inputs[0]]


def _feature_entry(node: gs.Node, batch: int | str | None) -> tuple[gs.Node, int, int, int, bool] | None:
    """Where a [batch, features] Reshape target keeps its feature count: (node holding the
    constant, its input index, the entry, the value, whether the batch entry is given).

    The batch entry counts as given only when it is 0 (copy), the input's own batch size, or -1
    beside a spelled-out width: ``[C, -1]`` is not a flatten.
    Either a constant ``[N or 0, F or -1]``, or a computed ``Concat(<batch from Shape>, [F])`` as
    torch writes ``x.view(x.size(0), -1)`` (TorchScript: F = -1; dynamo: the width spelled out)."""
    target = constant_values(node.inputs[1])
    if target is not None:
        if target.size != 2:
            return None
        first, second = (int(v) for v in target.reshape(-1))
        return node, 1, 1, second, first == 0 or first == batch or (first == -1 and second != -1)
    producer = node.inputs[1].inputs[0] if node.inputs[1].inputs else None
    if producer is None or producer.op != "Concat" or len(producer.inputs) != 2:
        return None
    last = constant_values(producer.inputs[-1])
    if last is None or last.size != 1 or constant_values(producer.inputs[0]) is not None:
        return None
    return producer, 1, 0, int(last.reshape(-1)[0]), True


@register
class SqueezeRule(_SameLayout):
    """Squeeze / Unsqueeze of spatial axes: [N, C, 1, 1] <-> [N, C]."""

    ops = ("Squeeze", "Unsqueeze")

    def check(self, node, ctx):
        axes = _axes(node, ctx, 1, 13)
        rank = ctx.rank(node.outputs[0] if node.op == "Unsqueeze" else node.inputs[0])
        if axes is None or rank is None:
            return Reason.at("unknown-axes", node, "has axes that are not spelled out")
        if min(_norm(axes, rank)) < 2:
            return Reason.at("transpose-channel-axis", node, "moves the channel axis")
        layout = ctx.layout(node.inputs[0])
        if node.op == "Unsqueeze" and any(s.repeat != 1 for s in layout):
            return Reason.at("flatten-to-channels", node, "turns flattened features into channels")
        return None


@register
class ShapeRule(Rule):
    """Shape of a channel-carrying tensor is fine when only other dims are read from it
    (``Shape(x)[0]`` for the batch, ``[2]``, ``[3]`` for the spatial size), never the channel count."""

    ops = ("Shape",)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        rank = ctx.rank(node.inputs[0]) or 0
        start, end = attr(node, "start", 0), attr(node, "end", rank)
        start, end = (min(max(v + rank if v < 0 else v, 0), rank) for v in (start, end))
        if not start <= 1 < end:
            return
        length = end - start  # Gather indexes the Shape output, whose entry i is dim start + i
        for consumer in node.outputs[0].outputs:
            index = constant_values(consumer.inputs[1]) if consumer.op == "Gather" else None
            read = None if index is None else {int(i) + (length if i < 0 else 0) + start for i in index.reshape(-1)}
            if read is None or attr(consumer, "axis", 0) != 0 or 1 in read:
                ctx.block(layout, Reason.at("shape-read", node, f"reads the channel count (used by {consumer.op} {consumer.name})"))
                return
        if any(o is node.outputs[0] for o in ctx.graph.outputs):
            ctx.block(layout, Reason.at("shape-read", node, "is a graph output"))


@register
class SplitRule(Rule):
    """Split on the channel axis (YOLO's CSP blocks): each output carries a part of the input's
    spaces; every part keeps at least one channel, and the split sizes are rewritten."""

    ops = ("Split",)

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        if not is_channel_axis(attr(node, "axis", 0), ctx.rank(node.inputs[0])):
            block_inputs(node, ctx, "split-axis", "splits an axis other than the channels")
            return
        if any(s.repeat != 1 for s in layout):
            block_inputs(node, ctx, "flattened-features", "splits flattened features")
            return
        total = width(layout)
        if opset(ctx) < 13:
            sizes = attr(node, "split")
        else:
            sizes = constant_values(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None
            if len(node.inputs) > 1 and node.inputs[1].name and sizes is None:
                block_inputs(node, ctx, "computed-parameter", "has computed split sizes")
                return
        if sizes is None:  # equal parts
            n = len(node.outputs)
            if total % n:
                block_inputs(node, ctx, "unknown-axes", f"splits {total} channels into {n} unequal parts it does not spell out")
                return
            sizes = [total // n] * n
        bounds = np.concatenate([[0], np.cumsum(np.asarray(sizes, np.int64).reshape(-1))])
        parts = [cut(layout, int(lo), int(hi)) for lo, hi in zip(bounds[:-1], bounds[1:])]
        for out, part in zip(node.outputs, parts):
            ctx.take_part(part)
            ctx.set_layout(out, part)
        ctx.edit(SetSplitSizes(node, parts, opset(ctx)))

    def dead_values(self, node, ctx, inputs):
        if inputs[0] is None:
            return [None] * len(node.outputs)
        out, start = [], 0
        for tensor in node.outputs:
            size = channels(ctx.layout(tensor))
            out.append(inputs[0][start : start + size])
            start += size
        return out


@register
class SliceRule(Rule):
    """Slice: spatial slicing passes the channels through; a step-1 slice of the channel axis
    takes a part of the input's spaces (starts/ends: attributes before opset 10, inputs from 10)."""

    ops = ("Slice",)

    def _channel_range(self, node: gs.Node, ctx: Analysis) -> tuple[int, int, int] | Reason | None:
        """(entry in starts/ends, first, end) of the channels taken; None when the channel axis
        is not sliced; a reason when the slice cannot be followed."""
        rank = ctx.rank(node.inputs[0])
        if opset(ctx) < 10:
            starts, ends, axes, steps = attr(node, "starts"), attr(node, "ends"), attr(node, "axes"), None
        else:
            given = [len(node.inputs) > i and bool(node.inputs[i].name) for i in range(1, 5)]
            values = [constant_values(node.inputs[i]) if given[i - 1] else None for i in range(1, 5)]
            if any(g and v is None for g, v in zip(given, values)):
                return Reason.at("computed-parameter", node, "has computed bounds")
            starts, ends, axes, steps = values
        if starts is None or ends is None or rank is None:
            return Reason.at("slice-unsupported", node, "has bounds onnx-bnslim cannot read")
        starts, ends = [int(v) for v in np.reshape(starts, -1)], [int(v) for v in np.reshape(ends, -1)]
        axes = list(range(len(starts))) if axes is None else _norm([int(v) for v in np.reshape(axes, -1)], rank)
        steps = [1] * len(starts) if steps is None else [int(v) for v in np.reshape(steps, -1)]
        if 0 in axes:
            return Reason.at("slice-unsupported", node, "slices the batch axis")
        if 1 not in axes:
            return None
        entry = axes.index(1)
        total = width(ctx.layout(node.inputs[0]))
        if steps[entry] != 1:
            return Reason.at("slice-unsupported", node, f"takes every {steps[entry]}th channel")
        lo, hi = (min(max(v + total if v < 0 else v, 0), total) for v in (starts[entry], ends[entry]))
        return (entry, lo, hi) if hi > lo else Reason.at("slice-unsupported", node, "takes no channel")

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        layout = ctx.layout(node.inputs[0])
        if layout is None:
            return
        bounds = self._channel_range(node, ctx)
        if bounds is None:
            ctx.set_layout(node.outputs[0], layout)
        elif isinstance(bounds, Reason) or any(s.repeat != 1 for s in layout):
            ctx.block(layout, bounds if isinstance(bounds, Reason) else
                      Reason.at("slice-unsupported", node, "slices flattened features"))
        else:
            entry, lo, hi = bounds
            part = cut(layout, lo, hi)
            ctx.take_part(part)
            ctx.edit(SetSliceRange(node, entry, cut(layout, 0, lo), part, opset(ctx)))
            ctx.set_layout(node.outputs[0], part)

    def dead_values(self, node, ctx, inputs):
        bounds = self._channel_range(node, ctx)
        if inputs[0] is None or bounds is None:
            return [inputs[0]]
        _, lo, hi = bounds
        return [inputs[0][lo:hi]]

"""Choosing channels: one global ranking by importance over every prunable space."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from ..channels.context import Analysis
from ..channels.layout import Layout, Segment
from ..errors import BnSlimError
from ..options import PruneOptions
from ..hardware import group_width, round_up_width, round_width, round_widths
from ..ir.values import constant_shape
from ..ir.weights import CONV_OPS
from ..rules import RULES
from .replacement import dead_values, unsafe_channels


@dataclass
class Plan:
    """Kept channel indices per space (root id); spaces not listed keep everything."""

    kept: dict[int, np.ndarray]
    analysis: Analysis
    chosen: int = 0  # channels the ranking chose, before rounding widths (and evening out groups) kept some
    dead_level: float = 0.0  # scores at or below this are the dead cluster (see dead_level())
    live_removed: int = 0  # removed channels scored above the dead level
    max_removed_score: float | None = None
    unsafe_kept: int = 0  # channels below the cut kept: their replacement is not a known constant
    ranked: int = 0  # channels the ranking may remove (scored, with a known replacement everywhere)
    unsafe_where: dict[str, int] = field(default_factory=dict)  # consumer -> channels it made unsafe
    capped: int = 0  # channels the per-layer cap (max_layer_ratio) kept
    min_kept: int = 0  # channels --min-channels (or a Split / Slice part's last channel) kept
    rounded_back: int = 0  # chosen channels rounding widths to the block put back
    rounded_back_dead: int = 0  # of those, the ones in the dead cluster (or exact zeros)
    rounded_down: int = 0  # channels rounding down removed beyond the chosen ones
    derived_removed: int = 0  # shared channels removed because every reader BN's branch dropped them
    branch_kept: int = 0  # chosen channels a reader BN's branch still reads (so the shared tensor keeps them)
    budget: dict = field(default_factory=dict)  # for --target-macs / --target-params: target and reached
    notes: list[str] = field(default_factory=list)  # what width rounding did beyond the count, one line each
    dead: dict = field(default_factory=dict, repr=False)  # replacement values per tensor (replacement.dead_values)

    def summary(self) -> dict:
        """What the selection did, for the report: every channel the ranking chose is removed,
        or kept for one of the reasons counted here."""
        return {"ranked": self.ranked, "chosen": self.chosen, "dead_level": self.dead_level, "live_removed": self.live_removed,
                "max_removed_score": self.max_removed_score, "kept_unknown_replacement": self.unsafe_kept,
                "unknown_replacement_at": dict(self.unsafe_where), "kept_by_layer_cap": self.capped,
                "kept_by_branches": self.branch_kept, "removed_by_branches": self.derived_removed,
                "kept_by_min_channels": self.min_kept, "kept_by_rounding": self.rounded_back,
                "dead_kept_by_rounding": self.rounded_back_dead, "removed_by_rounding": self.rounded_down,
                "budget": dict(self.budget)}

    def _kept(self, seg: Segment) -> np.ndarray:
        """Kept channels of the segment, numbered from its own first channel."""
        root, first, size = self.analysis.where(seg)
        idx = self.kept.get(root)
        if idx is None:
            return np.arange(size)
        return idx[(idx >= first) & (idx < first + size)] - first

    def keep_index(self, layout: Layout) -> np.ndarray:
        """Indices along the channel axis of a tensor with this layout that survive."""
        parts, offset = [], 0
        for seg in layout:
            idx = self._kept(seg)
            if seg.repeat == 1:
                parts.append(offset + idx)
            else:
                parts.append((offset + idx[:, None] * seg.repeat + np.arange(seg.repeat)[None, :]).reshape(-1))
            offset += seg.size * seg.repeat
        return np.concatenate(parts).astype(np.int64) if parts else np.zeros(0, np.int64)

    def removed_mask(self, layout: Layout) -> np.ndarray:
        """One flag per channel (not per flattened entry): True where the channel goes."""
        parts = []
        for seg in layout:
            mask = np.ones(seg.size, bool)
            mask[self._kept(seg)] = False
            parts.append(mask)
        return np.concatenate(parts) if parts else np.zeros(0, bool)


def dead_level(scores: np.ndarray) -> float:
    """The score at or below which channels count as dead, or 0 (exact zeros only) when the
    scores show no dead cluster -- as in models trained without the L1 penalty.

    Network Slimming's sparsity leaves the log-scores bimodal: live gammas around 0.1-1, dead
    ones decades below. The split is Otsu's threshold on log10 scores, accepted when the two
    classes explain at least 80% of the variance (a single normal mode explains 64%) and their
    means lie at least two decades apart (a layer whose gammas all shrank together, a decade or
    so below the rest, is alive: the next BN renormalises it); the level is the highest score
    of the lower class."""
    values = np.sort(np.asarray(scores, np.float64)[np.isfinite(scores)])
    values = values[values > 0]  # exact zeros are dead whatever the split: they would be a class of their own
    if len(values) < 4:
        return 0.0
    logs = np.log10(values)
    n = np.arange(1, len(logs))
    low_mean = np.cumsum(logs)[:-1] / n
    high_mean = (logs.sum() - np.cumsum(logs)[:-1]) / (len(logs) - n)
    between = n * (len(logs) - n) * (low_mean - high_mean) ** 2 / len(logs) ** 2
    k = int(np.argmax(between))
    total = logs.var()
    if total <= 0 or between[k] / total < 0.8 or high_mean[k] - low_mean[k] < 2.0:
        return 0.0
    return float(values[k])


# data scores (data_importance: a channel's share of its consumers' output variance) at or below
# this are dead: measured, the channels Network Slimming killed score 0 or at most 2e-8 at their
# consumers (the sparse fixtures), the live channels of the ordinary fixtures at least 7.6e-5
DATA_DEAD_SHARE = 1e-6


def data_dead_level(scores: np.ndarray) -> float:
    """The dead level of data scores: they are shares of measured variance, on one absolute
    scale, so a dead channel is one whose removal costs its consumers at most
    :data:`DATA_DEAD_SHARE` of their output variance -- not a cluster found by shape (the
    data scores of an ordinary model can be bimodal where nothing is dead: a split would
    exempt live channels from --max-layer-ratio)."""
    values = np.asarray(scores, np.float64)
    dead = values[np.isfinite(values) & (values <= DATA_DEAD_SHARE)]
    return float(dead.max()) if len(dead) else 0.0


class Costs:
    """MACs and parameters of the graph's layers as a function of the kept channels.

    A layer's MACs and weights scale with the kept fraction of its output channels times the
    kept fraction of its input channels (a depthwise conv: its channels once). Channels are
    numbered globally (root space offset + channel) so that a plan is costed with numpy."""

    def __init__(self, analysis: Analysis, dead: dict[str, np.ndarray] | None = None, curves: dict | None = None):

        self.curves = curves or {}  # node name -> latency.LatencyCurve: the third total, in ms
        self.timed: list[tuple] = []  # (curve, c_in, c_out, output index, input index) per timed layer
        self.analysis = analysis
        roots = analysis.roots()
        self.offset = {s.id: o for s, o in zip(roots, np.cumsum([0] + [s.size for s in roots]))}
        self.total_channels = sum(s.size for s in roots)
        self.layers: list[tuple[float, float, tuple | None, tuple | None]] = []
        shapes = {**analysis.shapes, **analysis.counted_shapes}  # shapes inference left open, from a run
        for node in analysis.nodes:
            rule = RULES.get(node.op) if node.domain in ("", "ai.onnx", None) else None
            cost = None if rule is None else rule.layer_cost(node, shapes)
            if cost is None:
                continue
            weight = constant_shape(node.inputs[1])
            params = float(np.prod(weight)) if weight is not None else 0.0
            out, inp = analysis.layout(node.outputs[0]), analysis.layout(node.inputs[0])
            if out is not None and inp is not None and out == inp:  # depthwise: one set of channels
                inp = None
            self.layers.append((float(cost[1]), params, self._index(out), self._index(inp)))
            curve = self.curves.get(node.name)
            if curve is not None:
                self.timed.append((curve, max(curve.c_in), max(curve.c_out), self._index(out), self._index(inp)))
        # --exact-borders: a padded consumer of removed non-zero constants gains a [C_out, H, W] map
        self.maps: list[tuple[float, tuple, np.ndarray]] = []
        for consumer in analysis.consumers if dead is not None else []:
            node, layout = consumer.node, analysis.layout(consumer.node.inputs[0])
            weight, out_shape = constant_shape(node.inputs[1]), analysis.shapes.get(node.outputs[0].name)
            if node.op not in CONV_OPS or weight is None or out_shape is None or \
                    RULES[node.op]._uniform(node, weight[2:]) or not all(isinstance(d, int) for d in out_shape[1:]):
                continue
            values = dead.get(node.inputs[0].name)
            if values is None or analysis.layout(node.outputs[0]) is None:
                continue
            nonzero = np.nan_to_num(values) != 0
            index = self._index(layout)[0]
            out = self._index(analysis.layout(node.outputs[0]))
            self.maps.append((float(np.prod(out_shape[1:])), out, index[nonzero[:len(index)]] if len(nonzero) == len(index)
                              else index))

    def _index(self, layout: Layout | None) -> tuple[np.ndarray, np.ndarray] | None:
        if not layout:
            return None
        roots, index = self.analysis.channel_ids(layout)
        repeat = np.concatenate([np.full(s.size, s.repeat) for s in layout]).astype(np.float64)
        return np.array([self.offset[r] for r in roots], np.int64) + index, repeat / repeat.sum()

    def flat(self, removed: dict[int, np.ndarray]) -> np.ndarray:
        gone = np.zeros(self.total_channels, bool)
        for root, mask in removed.items():
            gone[self.offset[root]:self.offset[root] + len(mask)] = mask
        return gone

    def totals(self, removed: dict[int, np.ndarray]) -> tuple[float, float]:
        """(MACs, parameters) with the channels flagged in ``removed`` (per root space) gone."""
        kept = ~self.flat(removed)
        macs = params = 0.0
        for layer_macs, layer_params, out, inp in self.layers:
            f = 1.0
            for side in (out, inp):
                if side is not None:
                    f *= float(side[1] @ kept[side[0]])
            macs += layer_macs * f
            params += layer_params * f
        gone = ~kept
        for size, out, inputs in self.maps:
            if gone[inputs].any():
                params += size * float(out[1] @ kept[out[0]])
        if not self.curves:
            return macs, params
        return macs, params, self.latency(kept)

    def latency(self, kept: np.ndarray) -> float:
        """Predicted ms of the timed layers at the kept widths (latency.LatencyCurve.cost)."""
        total = 0.0
        for curve, c_in, c_out, out, inp in self.timed:
            fo = 1.0 if out is None else float(out[1] @ kept[out[0]])
            fi = 1.0 if inp is None else float(inp[1] @ kept[inp[0]])
            total += curve.cost(round(c_in * fi), round(c_out * fo)) if not curve.tied else \
                curve.cost(0, round(c_out * fo))
        return total

    def per_channel(self, which: int) -> np.ndarray:
        """First-order saving (MACs, parameters or ms) of removing each channel alone, globally numbered."""
        saved = np.zeros(self.total_channels)
        if which == 2:  # a layer's time shared out like its MACs
            for curve, _, _, out, inp in self.timed:
                for side in (out, inp):
                    if side is not None:
                        np.add.at(saved, side[0], curve.full_ms * side[1])
            return saved
        for layer in self.layers:
            for side in layer[2:]:
                if side is not None:
                    np.add.at(saved, side[0], layer[which] * side[1])
        return saved


def select(analysis: Analysis, options: PruneOptions, curves: dict | None = None) -> Plan:
    """Choose which channels go.

    One global ranking by importance over every prunable space, walked greedily from the least
    important channel: ``ratio`` takes that fraction of the ranked channels, ``threshold`` every
    channel below it, ``target_macs`` / ``target_params`` / ``target_latency`` as many as it
    takes to reach the budget (ranked by importance per MAC, parameter or millisecond saved; the
    latency ``curves`` come from :func:`onnxslim_bn.passes.latency.layer_latency_table`). The walk
    skips a channel when

    - its replacement value is not a known constant at some consumer (:mod:`.replacement`),
    - its space would fall below ``min_channels``, or a Split / Slice part below one channel,
    - its layer would lose more than ``max_layer_ratio`` of its live channels (channels in the
      dead cluster, see :func:`dead_level`, are not limited).

    Then grouped convs even out their groups, kept widths are rounded to the block (``round_to``,
    up or down, :meth:`_Walk._round`), and a tensor read by reader BNs' branches (see
    :class:`onnxslim_bn.channels.context.Selector`) loses only the channels every one of them dropped.
    """

    dead = dead_values(analysis)
    unsafe = unsafe_channels(analysis, dead)
    spaces = [s for s in analysis.prunable() if s.sources]
    scores = {s.id: s.scores() for s in spaces}
    flat = np.concatenate([scores[s.id] for s in spaces]) if spaces else np.zeros(0)
    by_data = bool(spaces) and all(s.source_kinds == ["data"] for s in spaces)
    level = data_dead_level(flat) if by_data else dead_level(flat)
    walk = _Walk(analysis, spaces, scores, unsafe, level, options, dead)
    if options.target_macs is None and options.target_params is None and options.target_latency is None:
        order = np.argsort(flat, kind="stable")  # global ranking; ties keep graph order
        removable = ~walk.unsafe_flat
        if options.threshold is not None:
            order = order[flat[order] < options.threshold]
            target = len(order)  # every channel below it that can go (the walk counts those that cannot)
        else:  # a fraction of the channels that can go: those with a known replacement everywhere
            target = int(math.floor(options.ratio * int(removable.sum()) + 1e-9))
        plan = walk.plan(order, target)
    else:
        plan = _within_budget(analysis, walk, flat, options, curves)
    plan.unsafe_where = unsafe.where
    plan.ranked = int((~walk.unsafe_flat).sum())
    plan.dead = dead  # the surgery compensates with the same replacement values
    return plan


class _Walk:
    """The greedy walk over a ranking, with every constraint of :func:`select`."""

    def __init__(self, analysis, spaces, scores, unsafe, level, options, dead):
        self.analysis, self.spaces, self.scores, self.unsafe, self.dead = analysis, spaces, scores, unsafe, dead
        self.level, self.options = level, options
        self.owner = np.concatenate([np.full(s.size, i) for i, s in enumerate(spaces)]) if spaces else np.zeros(0, int)
        self.channel = np.concatenate([np.arange(s.size) for s in spaces]) if spaces else np.zeros(0, int)
        self.flat = np.concatenate([scores[s.id] for s in spaces]) if spaces else np.zeros(0)
        self.block = options.block()
        self.rounded_back = self.rounded_back_dead = self.rounded_down = 0
        self.fine_everywhere = False  # a finer block for every space (a budget out of reach otherwise)
        self.costs, self.which = None, 0  # a budget's costs: rounding weighs channels by them
        self.unsafe_flat = np.concatenate([unsafe.mask.get(s.id, np.zeros(s.size, bool)) for s in spaces]) \
            if spaces else np.zeros(0, bool)

    def removed(self, order: np.ndarray, target: int) -> tuple[dict[int, np.ndarray], dict]:
        options, spaces = self.options, self.spaces
        cap = options.max_layer_ratio
        removed = {s.id: np.zeros(s.size, bool) for s in spaces}
        left = {s.id: s.size - min(s.size, options.min_channels) for s in spaces}
        live_left = {s.id: int(math.floor(cap * int((self.scores[s.id] > self.level).sum()) + 1e-9)) for s in spaces}
        part_left = {s.id: [[o, n, n - min(n, options.min_channels)] for o, n in set(s.parts)] for s in spaces}
        # every channel the walk passes over is counted under its reason
        stats = {"chosen": 0, "unsafe": 0, "capped": 0, "min_kept": 0}
        for i in order:
            if stats["chosen"] == target:
                break
            space, c = spaces[self.owner[i]], int(self.channel[i])
            if self.unsafe_flat[i]:  # it cannot go: its value is not a known constant at some consumer
                stats["unsafe"] += 1
                continue
            parts = [p for p in part_left[space.id] if p[0] <= c < p[0] + p[1]]
            if left[space.id] == 0 or any(p[2] == 0 for p in parts):
                stats["min_kept"] += 1  # --min-channels, or a Split / Slice part down to one channel
                continue
            live = self.flat[i] > self.level
            if live and live_left[space.id] == 0:
                stats["capped"] += 1
                continue
            left[space.id] -= 1
            live_left[space.id] -= live
            for p in parts:
                p[2] -= 1
            removed[space.id][c] = True
            stats["chosen"] += 1
        for s in spaces:
            removed[s.id] = self._finish(s, removed[s.id])
        self._round(removed)
        stats["derived"] = self._derive(removed)
        stats["branch_kept"] = self.branch_kept
        stats["rounded_back"], stats["rounded_back_dead"] = self.rounded_back, self.rounded_back_dead
        stats["rounded_down"] = self.rounded_down
        return removed, stats

    def _finish(self, s, gone: np.ndarray) -> np.ndarray:
        """Even out groups: every group of a grouped conv loses the same number of channels."""
        options, scores = self.options, self.scores[s.id]
        gone = gone.copy()
        if s.groups > 1:  # the same number from every group: the lowest-scored of what was chosen
            blocks = gone.reshape(s.groups, -1)
            per_block = int(blocks.sum(1).min())
            block_scores = np.where(blocks, scores.reshape(s.groups, -1), np.inf)
            picks = np.argsort(block_scores, axis=1, kind="stable")[:, :per_block]
            gone = np.zeros_like(blocks)
            np.put_along_axis(gone, picks, True, axis=1)
            return gone.reshape(-1)
        return gone

    def _round(self, removed: dict[int, np.ndarray]) -> None:
        """Kept widths to multiples of the block. A ``--ratio`` / ``--threshold`` run rounds *up*
        (:func:`onnxslim_bn.hardware.round_up_width`): it puts back the best of the removed
        channels (dead ones, where the model was sparsity-trained), and rounds down only through
        dead channels (:meth:`_up_or_dead_down`), so it never removes a live channel the ranking
        kept. A budget rounds up or down, whichever keeps its total nearest the
        selection (:func:`onnxslim_bn.hardware.round_widths`), and down never past the
        constraints of the walk (``min_channels``, ``max_layer_ratio``, unknown replacements).
        Grouped spaces round per group (:meth:`_round_groups`); spaces that Split / Slice take
        parts of keep their widths. ``self.rounded_back`` counts the channels rounding put back."""
        block = self.block
        self.notes, self.whole_groups = [], []
        self.rounded_back = self.rounded_back_dead = self.rounded_down = 0
        if block <= 1:
            return
        spaces = [s for s in self.spaces if s.groups == 1 and not s.parts and removed[s.id].any()]
        machine = max(block, self.options.block())
        # a finer block a budget fell back to applies to the spaces off the machine's block (a
        # 24-wide layer); those on it keep it, or their convs would leave the blocked kernels
        batches = [(block, spaces)] if block == machine or self.fine_everywhere else \
            [(machine, [s for s in spaces if s.size % machine == 0]), (block, [s for s in spaces if s.size % machine])]
        for step, members in batches:
            self._round_spaces(removed, members, step)
        # grouped convs: the machine's block, not a finer one a budget fell back to (off it a
        # grouped conv leaves the blocked kernels and runs slower than unpruned)
        grouped_block = machine
        for s in self.spaces:
            if s.groups > 1 and not s.parts and removed[s.id].any():
                self._round_groups(s, removed[s.id], grouped_block)
        if self.whole_groups:
            self.notes.append(f"grouped channels kept whole, as fewer than {grouped_block} per group would take the grouped "
                              "conv off onnxruntime's blocked kernels (slower than not pruning it): "
                              + ", ".join(self.whole_groups))

    def _removable(self, s, gone: np.ndarray) -> np.ndarray:
        """Channels of ``s`` that rounding down may still take, in the order it takes them
        (lowest score first), within ``min_channels`` and ``max_layer_ratio``."""
        scores = self.scores[s.id]
        mask = self.unsafe.mask.get(s.id, np.zeros(s.size, bool))
        free = np.flatnonzero(~gone & ~mask & np.isfinite(scores))
        free = free[np.argsort(scores[free], kind="stable")]
        live = scores > self.level
        live_left = int(math.floor(self.options.max_layer_ratio * int(live.sum()) + 1e-9)) - int((gone & live).sum())
        free = free[~live[free] | (np.cumsum(live[free]) <= max(live_left, 0))]
        room = s.size - min(s.size, self.options.min_channels) - int(gone.sum())
        return free[:max(room, 0)]

    def _round_spaces(self, removed: dict[int, np.ndarray], spaces: list, block: int) -> None:
        """Round ungrouped ``spaces`` to ``block`` (see :meth:`_round`)."""
        if not spaces:
            return
        keeps = [int(s.size - removed[s.id].sum()) for s in spaces]
        takes = [self._removable(s, removed[s.id]) for s in spaces]
        if self.costs is None:  # --ratio / --threshold: up, or down through dead channels only
            widths = [self._up_or_dead_down(s, keep, take, block) for s, keep, take in zip(spaces, keeps, takes)]
        else:
            widths = round_widths(keeps, [s.size for s in spaces], block, self.options.min_channels, self.weights(spaces),
                                  least=[keep - len(t) for keep, t in zip(keeps, takes)])
        for s, keep, width, take in zip(spaces, keeps, widths, takes):
            gone, scores = removed[s.id], self.scores[s.id]
            if width % block and 2 * (s.size - width) <= block:  # a few channels off a whole space: not
                width = s.size  # worth a width off the block (the kernels would run it slower)
            if width > keep:
                back = np.flatnonzero(gone)[np.argsort(-scores[gone], kind="stable")[:width - keep]]
                gone[back] = False
                self.rounded_back += len(back)
                self.rounded_back_dead += int((scores[back] <= self.level).sum())
            elif width < keep:
                gone[take[:keep - width]] = True
                self.rounded_down += keep - width

    def _up_or_dead_down(self, s, keep: int, take: np.ndarray, block: int) -> int:
        """A --ratio / --threshold width: the multiple of the block above ``keep``
        (:func:`onnxslim_bn.hardware.round_up_width`), or the one below when it is nearer and
        every channel it takes is dead (in the dead cluster, or exactly 0) like those chosen."""
        up = round_up_width(s.size, keep, block)
        down = keep // block * block
        if up == keep or down < max(block, self.options.min_channels) or keep - down >= up - keep:
            return up
        extra = take[:keep - down]
        threshold = self.options.threshold
        dead = self.scores[s.id][extra] <= self.level
        if threshold is not None:
            dead &= self.scores[s.id][extra] < threshold
        return down if len(extra) == keep - down and dead.all() else up

    def _round_groups(self, s, gone: np.ndarray, block: int) -> None:
        """A grouped space: the same width in every group; a budget rounds up or down, whichever
        is nearer, a ``--ratio`` / ``--threshold`` run up only.

        Groups already on the block (``per % block == 0``) stay on it: each group keeps a multiple
        of the block, or the whole space stays when no such width is left (onnxruntime's blocked
        kernels take a grouped conv only when every group's input and output widths are multiples
        of the block; off it, the conv runs unblocked between two layout reorders, slower than the
        unpruned conv: :func:`onnxslim_bn.hardware.group_width`). Otherwise only the whole width
        goes on the block (each group a multiple of block / gcd(block, groups))."""
        per = s.size // s.groups
        blocks, scores = gone.reshape(s.groups, per), self.scores[s.id].reshape(s.groups, per)
        mask = self.unsafe.mask.get(s.id, np.zeros(s.size, bool)).reshape(s.groups, per)
        keep = per - int(blocks[0].sum())
        least = max(1, -(-self.options.min_channels // s.groups))
        step = block if per % block == 0 else block // math.gcd(block, s.groups)
        if self.costs is None:
            width = round_up_width(per, keep, step)
        elif per % block == 0:
            width = group_width(per, keep, block, least)
        else:
            width = round_width(per, keep, step, least)
        if per % block == 0 and width == per and keep < per:
            self.whole_groups.append(f"{s.producers[0] if s.producers else f'space {s.id}'} ({s.groups}x{per})")
        if width > keep:
            for row, score in zip(blocks, scores):
                back = np.flatnonzero(row)[np.argsort(-score[row], kind="stable")[:width - keep]]
                row[back] = False
                self.rounded_back += len(back)
                self.rounded_back_dead += int((score[back] <= self.level).sum())
        elif width < keep:
            live = self.scores[s.id] > self.level
            live_left = int(math.floor(self.options.max_layer_ratio * int(live.sum()) + 1e-9)) - int((gone & live).sum())
            free = [np.flatnonzero(~row & ~m & np.isfinite(score)) for row, m, score in zip(blocks, mask, scores)]
            picks = [f[np.argsort(score[f], kind="stable")[:keep - width]] for f, score in zip(free, scores)]
            taken_live = sum(int((score[p] > self.level).sum()) for p, score in zip(picks, scores))
            if all(len(p) == keep - width for p in picks) and taken_live <= live_left:  # every group loses the same
                for row, p in zip(blocks, picks):
                    row[p] = True

    def weights(self, spaces) -> list[float]:
        """What one channel of each space costs, for rounding towards the budget (1: channels)."""
        if self.costs is None:
            return [1.0] * len(spaces)
        saved = self.costs.per_channel(self.which)
        return [float(saved[self.costs.offset[s.id]]) for s in spaces]

    def _derive(self, removed: dict[int, np.ndarray]) -> int:
        """A tensor read by reader BNs keeps every channel one of their branches keeps; a shared
        space without a score of its own loses the channels all of them dropped (when nothing
        else reads them with an unknown value). Returns how many channels that removed.

        A branch may read a tensor whose space a branch joined (an Add of its output with an
        older tensor), so no order of the spaces settles them all at once: the passes repeat
        until nothing changes (each only puts channels back, so they end)."""
        analysis = self.analysis
        readers: dict[int, list] = {}
        for sel in analysis.selectors:
            for root in {analysis.find(seg.space) for seg in sel.source}:
                readers.setdefault(root, []).append(sel)
        roots = [r for r in readers if not analysis.spaces[r].blocked and analysis.spaces[r].producers]
        chosen = {r: removed[r].copy() for r in roots if r in self.scores}
        derived: dict[int, np.ndarray] = {}
        keeps: dict[int, np.ndarray] = {}
        for _ in range(len(roots) + 2):
            changed = False
            for root in roots:
                space = analysis.spaces[root]
                keep = np.zeros(space.size, bool)
                for sel in readers[root]:
                    own = (Segment(sel.space, analysis.spaces[sel.space].size),)
                    dropped = _flags(analysis, own, removed)
                    ids, index = analysis.channel_ids(sel.source)
                    keep[index[(ids == root) & ~dropped]] = True
                keeps[root] = keep
                if root in self.scores:  # scored too: what a branch still reads stays (groups evened out again)
                    gone = self._finish(space, removed[root] & ~keep)
                else:
                    gone = ~keep & ~self.unsafe.mask.get(root, np.zeros(space.size, bool))
                    gone = _respect(space, gone, self.options.min_channels, self.block)
                    if root in derived:
                        gone &= derived[root]
                    derived[root] = gone
                if root not in removed or not np.array_equal(gone, removed[root]):
                    removed[root] = gone
                    changed = True
            if not changed:
                break
        self.branch_kept = sum(int((chosen[r] & keeps[r]).sum()) for r in chosen)
        return sum(int(g.sum()) for g in derived.values())

    def plan(self, order: np.ndarray, target: int) -> Plan:
        removed, stats = self.removed(order, target)
        kept = {root: np.flatnonzero(~gone) for root, gone in removed.items()}
        plan = Plan(kept, self.analysis, chosen=stats["chosen"], dead_level=self.level,
                    unsafe_kept=stats["unsafe"], capped=stats["capped"], derived_removed=stats["derived"],
                    branch_kept=stats["branch_kept"], min_kept=stats["min_kept"], rounded_back=stats["rounded_back"],
                    rounded_back_dead=stats["rounded_back_dead"], rounded_down=stats["rounded_down"])
        plan.notes = list(self.notes)
        gone_scores = np.concatenate([self.scores[s.id][removed[s.id]] for s in self.spaces]) if self.spaces else np.zeros(0)
        gone_scores = gone_scores[np.isfinite(gone_scores)]
        plan.live_removed = int((gone_scores > self.level).sum())
        plan.max_removed_score = float(gone_scores.max()) if len(gone_scores) else None
        return plan


def _flags(analysis: Analysis, layout: Layout, removed: dict[int, np.ndarray]) -> np.ndarray:
    """Per channel of ``layout``: whether ``removed`` (per root space) flags it."""
    roots, index = analysis.channel_ids(layout)
    return np.array([bool(removed[r][i]) if r in removed else False for r, i in zip(roots, index)], bool)


def _respect(space, gone: np.ndarray, min_channels: int, round_to: int) -> np.ndarray:
    """Put channels back so that the space keeps min_channels, every part one channel, and a
    width that is a multiple of round_to; grouped spaces lose nothing (their groups would have
    to be evened out across every reader)."""
    gone = gone.copy()
    if space.groups > 1:
        return np.zeros_like(gone)
    for offset, size in set(space.parts):
        part = gone[offset:offset + size]
        if part.all():
            part[0] = False
    short = min(space.size, min_channels) - int((~gone).sum())
    if short > 0:
        gone[np.flatnonzero(gone)[:short]] = False
    if space.size >= 4 * round_to and not space.parts:
        keep_n = int((~gone).sum())
        extra = min(space.size, math.ceil(keep_n / round_to) * round_to) - keep_n
        gone[np.flatnonzero(gone)[:extra]] = False
    return gone


# a budget met on the machine's block may land this far (a fraction of the original's cost)
# under the target; further, finer blocks are tried (narrow layers step by a whole block)
BUDGET_SLACK = 0.02
BLOCK_FLOOR = 4  # the finest halved block: below it a width is as good as unrounded for the kernels


def _within_budget(analysis: Analysis, walk: _Walk, flat: np.ndarray, options: PruneOptions,
                   curves: dict | None = None) -> Plan:
    """The fewest channels, taken in order of importance per unit of cost, that bring the MACs
    (or parameters, or ms) to the budget: a bisection over the length of the walk, each
    candidate plan costed exactly (rounding and derived removals included). When widths on the
    block (``round_to``) cannot come within ``BUDGET_SLACK`` of the budget, halved blocks are
    tried, and the plan says which it used."""
    which = 0 if options.target_macs is not None else 1 if options.target_params is not None else 2
    if which == 2 and not curves:
        raise BnSlimError("--target-latency needs the per-layer latency table (onnxslim_bn.passes.latency); "
                          "prune() measures it: pass the model through prune()")
    costs = Costs(analysis, walk.dead if options.exact_borders else None, curves if which == 2 else None)
    walk.costs, walk.which = costs, which
    fraction = (options.target_macs, options.target_params, options.target_latency)[which]
    full = costs.totals({})[which]
    per_channel = _channel_costs(analysis, walk, costs, which)
    order = np.argsort(flat / np.maximum(per_channel, 1e-30), kind="stable")
    limit = fraction * full
    # --round-to auto only (a block the user set is kept): the machine's block, then halved ones
    # down to BLOCK_FLOOR for the layers off the machine's block, then for every layer, and last
    # unrounded widths, until the plan comes within BUDGET_SLACK under the budget
    machine, tried = walk.block, []
    halved = []
    while options.round_to == "auto" and (halved or [machine])[-1] // 2 >= min(machine, BLOCK_FLOOR):
        halved.append((halved or [machine])[-1] // 2)
    steps = [(machine, False)] + [(b, False) for b in halved] + [(b, True) for b in halved]
    if options.round_to == "auto" and machine > 1:
        steps.append((1, True))
    for block, everywhere in steps:
        walk.block, walk.fine_everywhere = block, everywhere
        best, reached = _longest_fit(walk, order, costs, which, limit)
        tried.append((block, best, reached, everywhere))
        if best is not None and reached >= limit - BUDGET_SLACK * full:
            break
    met = [t for t in tried if t[1] is not None]
    # the met plan nearest the budget (the last tried, when it came within the slack), else (out
    # of reach on every block) the one that came closest
    block, best, reached, everywhere = max(met, key=lambda t: (t[2], t[0])) if met else \
        min(tried, key=lambda t: (t[2], -t[0]))
    walk.block, walk.fine_everywhere = block, everywhere
    if block != tried[0][0]:
        first = tried[0]
        missed = f"under the budget kept {first[2] / full:.1%}" if first[1] is not None else \
            f"could reach only {first[2] / full:.1%}"
        where = "in every layer" if everywhere else "in the layers whose width is off that block (the others keep it)"
        how = f"widths rounded to multiples of {block}, not {first[0]}, {where}" if block > 1 else \
            f"widths left unrounded, not on multiples of {first[0]} (some convs may leave the blocked kernels)"
        notes = [f"{how}: on the coarser block the nearest plan {missed} (budget {fraction:.1%}); "
                 "narrow layers cannot step finer"]
    else:
        notes = []
    plan = walk.plan(order, len(order) if best is None else best)
    plan.notes.extend(notes)
    reached = costs.totals({r: ~np.isin(np.arange(analysis.spaces[r].size), k) for r, k in plan.kept.items()})[which]
    plan.budget = {"metric": ("macs", "params", "latency")[which], "target": fraction,
                   "reached": reached / full if full else 1.0, "round_to": block}
    if best is None:  # everything the constraints allow is removed and the budget is still missed
        plan.budget["unreachable"] = True
    return plan


def _longest_fit(walk: _Walk, order: np.ndarray, costs: Costs, which: int, limit: float) -> tuple[int | None, float]:
    """The length of the walk whose plan (rounded as ``walk.block`` says) comes nearest under
    ``limit``, and the cost it reaches: a bisection, then a scan of the 48 lengths before it
    (rounding makes the cost step, so the nearest fit may lie a little earlier). None when
    even the whole walk stays above the limit."""
    lo, hi, best = 0, len(order), None
    while lo <= hi:
        mid = (lo + hi) // 2
        if costs.totals(walk.removed(order, mid)[0])[which] <= limit:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    if best is None:  # out of reach: what the whole walk comes to
        return None, costs.totals(walk.removed(order, len(order))[0])[which]
    fits = {best: costs.totals(walk.removed(order, best)[0])[which]}
    for n in range(max(0, best - 48), best):
        reached = costs.totals(walk.removed(order, n)[0])[which]
        if reached <= limit:
            fits[n] = reached
    best = max(fits, key=lambda n: (fits[n], -n))
    return best, fits[best]


def _channel_costs(analysis: Analysis, walk: _Walk, costs: Costs, which: int) -> np.ndarray:
    """What removing each ranked channel alone saves (MACs or parameters), in walk order."""
    saved = costs.per_channel(which)
    return np.concatenate([saved[costs.offset[s.id]:costs.offset[s.id] + s.size] for s in walk.spaces]) \
        if walk.spaces else np.zeros(0)

"""What the graph's layers cost (MACs, parameters, ms) as a function of the kept channels."""

from __future__ import annotations

import numpy as np

from ...channels.context import Analysis
from ...channels.layout import Layout
from ...ir.values import constant_shape
from ...ir.weights import CONV_OPS
from ...rules.layers import uniform_response
from ..metrics import layer_costs


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
        for node, _, layer_macs, layer_params in layer_costs(analysis.nodes, shapes):
            out, inp = analysis.layout(node.outputs[0]), analysis.layout(node.inputs[0])
            if out is not None and inp is not None and out == inp:  # depthwise: one set of channels
                inp = None
            self.layers.append((float(layer_macs), float(layer_params), self._index(out), self._index(inp)))
            curve = self.curves.get(node.name)
            if curve is not None:
                self.timed.append((curve, max(curve.c_in), max(curve.c_out), self._index(out), self._index(inp)))
        # --exact-borders: a padded consumer of removed non-zero constants gains a [C_out, H, W] map
        self.maps: list[tuple[float, tuple, np.ndarray]] = []
        for consumer in analysis.consumers if dead is not None else []:
            node, layout = consumer.node, analysis.layout(consumer.node.inputs[0])
            weight, out_shape = constant_shape(node.inputs[1]), analysis.shapes.get(node.outputs[0].name)
            if node.op not in CONV_OPS or weight is None or out_shape is None or \
                    uniform_response(node, weight[2:]) or not all(isinstance(d, int) for d in out_shape[1:]):
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


"""One rule per op family, found through one registry keyed by op type.

A rule answers three questions about a node:

- :meth:`Rule.analyze` -- what happens to the channel spaces (open, pass on, merge, consume,
  block) and which parameters must be sliced when channels go (recorded as edits);
- :meth:`Rule.dead_values` -- what constant a removed channel carries on the output, given the
  constants on the inputs (a BN with gamma = 0 outputs beta, ReLU then gives relu(beta));
- :meth:`Rule.compensate` -- for consumers: the constant contribution of the removed input
  channels, folded into the bias so that the pruned model stays faithful.

Adding an op is adding one rule class here (and its test); nothing else dispatches on op types.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import ClassVar

import numpy as np
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..channels.layout import Layout, channels
from ..channels.reasons import Reason

RULES: dict[str, Rule] = {}


def register(cls: type[Rule]) -> type[Rule]:
    """Class decorator: one instance of the rule serves every op type it names."""
    instance = cls()
    for op in cls.ops:
        if op in RULES:
            raise ValueError(f"two rules claim op {op}: {type(RULES[op]).__name__} and {cls.__name__}")
        RULES[op] = instance
    return cls


@dataclass
class Compensation:
    """What a consumer adds to its bias for removed input channels (full output width)."""

    delta: np.ndarray
    exact: bool  # False: exact inside the image, approximate where padding meets the border
    missing: int  # removed channels whose constant value is unknown (not compensated)
    # for a padded Conv with static sizes: the border correction [C_out, H_out, W_out] that makes
    # it exact (computed on demand: --exact-borders)
    border: Callable[[], np.ndarray] | None = None


class Rule:
    ops: ClassVar[tuple[str, ...]] = ()

    def analyze(self, node: gs.Node, ctx: Analysis) -> None:
        raise NotImplementedError

    def dead_values(self, node: gs.Node, ctx: Analysis, inputs: list[np.ndarray | None]) -> list[np.ndarray | None]:
        """Per-channel constant of removed channels on each output; NaN where not constant."""
        return [_unknown(ctx, out) for out in node.outputs]

    def compensate(self, node: gs.Node, ctx: Analysis, dead: np.ndarray, removed: np.ndarray) -> Compensation | None:
        """For consumers only: the constant the removed input channels contributed."""
        return None

    def carry(self, node: gs.Node, dead: np.ndarray, removed: np.ndarray, carriers: np.ndarray) -> np.ndarray | None:
        """For consumers whose bias compensation is approximate at the borders: the weight with
        the removed channels' constants moved onto one kept channel that is constant too (one of
        ``carriers``), which the padding meets exactly as it met them; None where it cannot."""
        return None

    def add_bias(self, node: gs.Node, delta: np.ndarray, graph: gs.Graph) -> None:
        """For consumers only: add ``delta`` (kept output channels) to the node's bias."""
        raise NotImplementedError

    def bias(self, node: gs.Node) -> np.ndarray | None:
        """For layers with weights: the constant per-output-channel bias, if there is one
        (a BatchNorm folded into the layer always leaves one)."""
        return None

    def layer_cost(self, node: gs.Node, shapes: dict[str, list]) -> tuple[int, int] | None:
        """For layers with weights: (output channels, multiply-accumulates) at these shapes."""
        return None

    def weight_energy(self, node: gs.Node, out_weight: np.ndarray | None) -> np.ndarray | None:
        """For consumers: per input entry, the sum of its squared weights over the outputs, each
        output weighted by ``out_weight`` when given (data importance); None when the weight has
        no single output axis of that length."""
        return None

    def channel_scale(self, node: gs.Node) -> np.ndarray | None:
        """For a normalization: the per-channel factor it multiplies its input by (a BN's
        gamma / sqrt(var + eps)), when its parameters are constants."""
        return None


def _unknown(ctx: Analysis, tensor: gs.Tensor) -> np.ndarray | None:
    layout = ctx.layout(tensor)
    return None if layout is None else np.full(channels(layout), np.nan)


def attr(node: gs.Node, name: str, default=None):
    return node.attrs.get(name, default)


def opset(ctx: Analysis) -> int:
    return ctx.graph.opset


def carrying(node: gs.Node, ctx: Analysis) -> list[tuple[int, Layout]]:
    return [(i, ctx.layout(t)) for i, t in enumerate(node.inputs) if ctx.layout(t) is not None]


def block_inputs(node: gs.Node, ctx: Analysis, code: str, why: str) -> None:
    """Block every space that reaches ``node`` (reason ``code``); ``why`` completes "<op> <name> ..."."""
    for _, layout in carrying(node, ctx):
        ctx.block(layout, Reason.at(code, node, why))


def is_channel_axis(axis: int, rank: int | None) -> bool:
    """Whether ``axis`` (negative counts from the end) is axis 1 of a tensor of this rank."""
    return rank is not None and (axis + rank if axis < 0 else axis) == 1


def used(tensor: gs.Tensor, ctx: Analysis) -> bool:
    return bool(tensor.outputs) or any(tensor is o for o in ctx.graph.outputs)

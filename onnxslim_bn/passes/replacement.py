"""Replacement values: what a removed channel is replaced by, and where that is known.

Removing a channel is a claim: "at every layer that reads it, this channel's value is a
constant c, and c is folded in". A BN whose gamma is ~0 outputs its beta; the op rules carry
that constant through activations, pooling, joins and concatenations
(:meth:`onnxslim_bn.rules.Rule.dead_values`) to the layers that consume it, whose bias absorbs
it. Where a rule cannot prove the value constant -- a squeeze-excitation gate multiplies it by
a data-dependent factor, a Pad writes another value at the border, an average pool counts the
padding, the producer has no BN at all -- the value is unknown, and a channel whose value is
unknown at some consumer is not removable: the plan keeps it (:func:`unsafe_channels`).

With importance from data the rules' constants give way to measured ones: each consumer's
input mean per channel, on the calibration samples (:mod:`.data_importance`). The channels
such a run removes are live, so the replacement is an approximation wherever it is made; the
mean is the best constant in the least-squares sense, reconstruction refits the consumer, and
the check measures what is left. So behind a gate too the mean stands in.

Values are per channel (float64); NaN marks "unknown", and so does any non-finite result,
which errs on the side of keeping.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field

import numpy as np

from ..channels.context import Analysis
from ..rules import RULES


@dataclass(frozen=True)
class Row:
    """One line of the replacement algebra: what a removed channel's constant becomes through an op.

    ``zero``: a channel that is exactly 0 on the op's input (gamma = 0, beta = 0) is still a known
    constant on its output (not always 0: sigmoid(0) = 0.5), so it can be removed exactly.
    ``constant``: the same for any other constant c (gamma = 0, beta = c)."""

    ops: str
    zero: bool
    constant: bool
    why: str


# The algebra, in one place (the rules' ``dead_values`` implement it; tests/test_faithful_defaults.py
# builds one graph per row and checks that the dead channels go, exactly, or stay, counted).
ALGEBRA: dict[str, Row] = {
    "relu": Row("Relu, LeakyRelu, Elu, Tanh, Clip, HardSwish, PRelu", True, True, "f(c) is a constant; f(0) = 0"),
    "sigmoid": Row("Sigmoid, HardSigmoid", True, True, "f(c) is a constant (f(0) = 0.5, not 0)"),
    "silu": Row("x * Sigmoid(x) (SiLU, as exporters spell it)", True, True, "c * sigmoid(c)"),
    "se-gate": Row("Mul by a squeeze-excitation gate", True, False, "0 * gate = 0; c * gate depends on the data"),
    "maxpool-padded": Row("MaxPool (padded), GlobalAveragePool, GlobalMaxPool", True, True, "max / mean of c is c"),
    "avgpool": Row("AveragePool not counting the padding", True, True, "mean of c is c"),
    "avgpool-count-pad": Row("AveragePool counting the padding", True, False, "0 stays 0; c shrinks at the border"),
    "pad-zero": Row("Pad with value 0", True, False, "0 stays 0; c meets 0 at the border"),
    "pad-value": Row("Pad with value v != 0", False, False, "0 and c meet v at the border"),
    "pad-edge": Row("Pad edge / reflect", True, True, "repeats c"),
    "resize": Row("Resize (interpolation weights sum to 1)", True, True, "c stays c"),
    "depthwise-padded": Row("depthwise Conv, padded, no bias", True, False, "0 * w = 0; c * w loses taps at the border"),
    "depthwise-valid": Row("depthwise Conv, unpadded", True, True, "c * sum(w) + b"),
}


def dead_values(analysis: Analysis) -> dict[str, np.ndarray]:
    """The constant each removed channel carries, per channel-carrying tensor (NaN: unknown)."""

    dead: dict[str, np.ndarray] = {}
    for node in analysis.nodes:
        if not any(t.name in analysis.layouts for t in node.outputs):
            continue
        values = RULES[node.op].dead_values(node, analysis, [dead.get(t.name) for t in node.inputs])
        for tensor, value in zip(node.outputs, values):
            if value is not None and tensor.name in analysis.layouts:
                value = np.asarray(value, np.float64)
                dead[tensor.name] = np.where(np.isfinite(value), value, np.nan)
    # measured (importance from data): a removed channel is replaced at each consumer by its mean
    # there, also where the rules prove no constant (behind a gate, a Pad of another value): the
    # mean is the best constant in the least-squares sense, the channels removed are live ones
    # anyway (approximate by nature), and reconstruction refits the consumer
    for name, means in analysis.input_means.items():
        if name in analysis.layouts and (name not in dead or len(dead[name]) == len(means)):
            dead[name] = np.asarray(means, np.float64)
    return dead


@dataclass
class Unsafe:
    """Channels (per root space) whose replacement is not a known constant at some consumer."""

    mask: dict[int, np.ndarray] = field(default_factory=dict)
    where: dict[str, int] = field(default_factory=dict)  # consumer node -> channels it made unsafe

    def count(self) -> int:
        return int(sum(m.sum() for m in self.mask.values()))


def unsafe_channels(analysis: Analysis, dead: dict[str, np.ndarray]) -> Unsafe:
    """Every (space, channel) that some consumer reads with an unknown replacement value."""
    out = Unsafe()
    per_consumer: dict[str, set] = defaultdict(set)
    for consumer in analysis.consumers:
        tensor = consumer.node.inputs[0]
        layout = analysis.layout(tensor)
        if layout is None:
            continue
        roots, index = analysis.channel_ids(layout)
        values = dead.get(tensor.name, np.full(len(roots), np.nan))
        for root, channel in zip(roots[np.isnan(values)], index[np.isnan(values)]):
            space = analysis.spaces[int(root)]
            mask = out.mask.setdefault(int(root), np.zeros(space.size, bool))
            mask[channel] = True
            per_consumer[consumer.node.name].add((int(root), int(channel)))
    out.where = {name: len(chans) for name, chans in per_consumer.items()}
    return out

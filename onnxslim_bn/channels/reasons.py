"""Why a channel space is left alone, as data: a stable code, the node it names, and the detail.

A reason is made with its code where a rule finds it (as onnxscript's ``MatchResult.fail``
does), so the report groups spaces by code and keeps every reason, and no stage reads the
message text back. ``str(reason)`` is the message people read ("Reshape r changes the channel
axis ([1, 8, 4, 4] -> [1, 128])").
"""

from __future__ import annotations

from dataclasses import dataclass

import onnx_graphsurgeon as gs

# every code a reason may carry (the JSON report's ``blocked_code``), with what it means
CODES: dict[str, str] = {
    "protected": "a layer the user protected with --keep",
    "graph-output": "the channels reach a graph output",
    "shape-read": "a Shape reads the channel count, or is a graph output",
    "unknown-op": "an op no rule follows",
    "reshape-channel-axis": "a Reshape changes the channel axis",
    "transpose-channel-axis": "a Squeeze / Unsqueeze moves the channel axis",
    "flatten-to-channels": "an Unsqueeze turns flattened features into channels",
    "subgraph": "an If / Loop body reads the channels",
    "join-mismatch": "a join of tensors whose channel groups differ",
    "grouped-conv": "a grouped convolution whose groups the channels do not fit",
    "depthwise-unproduced": "a depthwise convolution of channels no layer produces",
    "computed-parameter": "a weight, bias or parameter computed in the graph",
    "batchnorm-unsupported": "a BatchNormalization the rules cannot slice",
    "second-output": "an op whose second output is in use",
    "cast-non-float": "a Cast of the channels to a non-float type",
    "per-entry-constant": "a constant that varies across entries, not channels",
    "width-mismatch": "a layer reads another number of channels than the tensor carries",
    "matmul-not-2d": "a Gemm / MatMul of a tensor that is not [batch, features]",
    "unknown-shape": "a rank or shape that shape inference left open",
    "flatten-unsupported": "a Flatten that does not keep the channels on axis 1",
    "slice-unsupported": "a Slice of the channels that cannot be followed",
    "concat-foreign-input": "a Concat that mixes in a tensor no layer prunes",
    "resize-channel-axis": "a Resize that scales the channel axis",
    "pad-channel-axis": "a Pad of the channel axis",
    "reduce-channel-axis": "a Reduce over the batch or channel axis, or over unnamed axes",
    "unknown-axes": "axes that are not spelled out",
    "channel-indices": "indices that depend on the channel count",
    "no-scale": "no BatchNorm scale, recovered or measured, ranks the channels",
    "concat-axis": "a Concat along an axis other than the channels",
    "split-axis": "a Split along an axis other than the channels",
    "flattened-features": "a Concat or Split of flattened features",
    "computed-operand": "arithmetic of the channels with a tensor computed in the graph",
    "power-of-channels": "a constant raised to the power of the channels",
    "broadcast-channel-axis": "arithmetic that broadcasts the channel axis",
}


@dataclass(frozen=True)
class At:
    """The node a reason names, as the user sees it (op type and name)."""

    op: str
    name: str


@dataclass(frozen=True)
class Reason:
    """Why channels cannot be removed: ``code`` (one of :data:`CODES`), the node (or None) and
    the detail, which completes "<op> <name> ..." when there is a node."""

    code: str
    node: At | None
    detail: str

    def __post_init__(self) -> None:
        if self.code not in CODES:
            raise ValueError(f"unknown reason code {self.code!r}")

    @classmethod
    def at(cls, code: str, node: gs.Node, detail: str) -> Reason:
        return cls(code, At(node.op, node.name), detail)

    def __str__(self) -> str:
        return self.detail if self.node is None else f"{self.node.op} {self.node.name} {self.detail}"

    def __lt__(self, other: Reason) -> bool:  # reasons sort as the messages they print
        return str(self) < str(other)

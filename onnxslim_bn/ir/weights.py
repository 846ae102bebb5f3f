"""THE weight-axis table: which axis of a layer's weight (input 1) holds its output channels and
which its input channels, its groups, its bias input and its scales.

This is IR knowledge -- the ONNX definitions of the four layer ops -- read alike by the rules
(slicing, compensation, MACs), the passes (refit, latency, data importance, selection) and the
app (bench's blame), so it sits in ``ir/``, below all of them:

==============  ==============================  =====================================
op              weight                          bias, scales
==============  ==============================  =====================================
Conv            ``[C_out, C_in / group, *k]``   input 2 ``[C_out]``
ConvTranspose   ``[C_in, C_out / group, *k]``   input 2 ``[C_out]``
Gemm            ``[K, N]``; transB ``[N, K]``   input 2 (C), times beta; A·B times alpha
MatMul          ``[K, N]``                      none
==============  ==============================  =====================================
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import onnx

CONV_OPS = frozenset({"Conv", "ConvTranspose"})  # a kernel on axes 2..; axis 1 counts channels per group
LAYER_OPS = CONV_OPS | {"Gemm", "MatMul"}  # the layers with a weight: they open and consume channel spaces
_SCALED = {"Gemm": ("alpha", "beta")}  # ops whose product and bias carry a scale attribute
_BIASED = CONV_OPS | {"Gemm"}  # ops with a bias input (index 2)
UNBIASED_OPS = LAYER_OPS - _BIASED  # a bias goes behind them as an Add (ir.values.add_after)
FEATURE_OPS = LAYER_OPS - CONV_OPS  # their output's last axis holds its channels


@dataclass(frozen=True)
class WeightAxes:
    """Where one layer's weight keeps its channels (see the module's table)."""

    op: str
    out_axis: int  # the weight's axis of output channels (per group on axis 1 of a convolution)
    in_axis: int  # the weight's axis of input channels (per group on axis 1 of a convolution)
    groups: int
    bias: int | None  # input index of the per-output-channel bias; None: the op has none (MatMul)
    scale: float = 1.0  # Gemm's alpha: the product's factor
    bias_scale: float = 1.0  # Gemm's beta: the bias's factor
    transposed_input: bool = False  # Gemm's transA: the activation is read transposed

    @property
    def spatial(self) -> bool:
        """A convolution: the weight's axes 2.. are its kernel, the input is [N, C, *spatial]."""
        return self.op in CONV_OPS

    @property
    def scatters(self) -> bool:
        """A transposed convolution: every input pixel scatters over several output pixels."""
        return self.spatial and self.in_axis == 0

    @property
    def scale_attrs(self) -> tuple[str, ...]:
        """The attributes holding ``scale`` and ``bias_scale`` (none for ops without them)."""
        return _SCALED.get(self.op, ())

    def _per_group(self, axis: int) -> int:
        return self.groups if self.spatial and axis == 1 else 1

    def in_channels(self, shape: tuple[int, ...] | list[int]) -> int:
        return int(shape[self.in_axis]) * self._per_group(self.in_axis)

    def out_channels(self, shape: tuple[int, ...] | list[int]) -> int:
        return int(shape[self.out_axis]) * self._per_group(self.out_axis)

    def shape(self, c_in: int, c_out: int, kernel: list[int] | tuple[int, ...] = ()) -> list[int]:
        """The weight's shape at ``c_in`` -> ``c_out`` channels (the inverse of the two above)."""
        dims = [0, 0]
        dims[self.in_axis] = c_in // self._per_group(self.in_axis)
        dims[self.out_axis] = c_out // self._per_group(self.out_axis)
        return dims + list(kernel)


def axes_of(op: str, attrs: Mapping) -> WeightAxes | None:
    """The table's row for ``op`` with these attributes; None for an op without a weight."""
    if op not in LAYER_OPS:
        return None
    bias = 2 if op in _BIASED else None
    if op in CONV_OPS:
        in_axis, out_axis = (0, 1) if op == "ConvTranspose" else (1, 0)
        return WeightAxes(op, out_axis, in_axis, int(attrs.get("group", 1)), bias)
    if op == "MatMul":
        return WeightAxes(op, 1, 0, 1, bias)
    transposed = bool(attrs.get("transB", 0))  # Gemm
    return WeightAxes(op, 0 if transposed else 1, 1 if transposed else 0, 1, bias, float(attrs.get("alpha", 1.0)),
                      float(attrs.get("beta", 1.0)), bool(attrs.get("transA", 0)))


def axes(node) -> WeightAxes | None:
    """:func:`axes_of` a graph node: an onnx-graphsurgeon ``Node`` or an ``onnx.NodeProto``."""
    if isinstance(node, onnx.NodeProto):
        return axes_of(node.op_type, {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute})
    return axes_of(node.op, node.attrs)

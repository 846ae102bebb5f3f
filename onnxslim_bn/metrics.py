"""Model size figures: channels, parameters, multiply-accumulates (MACs), op counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx


@dataclass
class Metrics:
    channels: int  # output channels of every Conv / ConvTranspose / Gemm / MatMul with a weight
    parameters: int
    macs: int
    size_bytes: int  # the file's size when known, else the weights' bytes
    ops: dict[str, int] = field(default_factory=dict)
    layers: dict[str, dict] = field(default_factory=dict)  # node name -> {op, out, macs}

    def to_dict(self) -> dict:
        return asdict(self)


_WEIGHTED = ("Conv", "ConvTranspose", "Gemm", "MatMul")


def measure(model: onnx.ModelProto, shapes: dict[str, list], size_bytes: int | None = None) -> Metrics:
    """Count a model. ``shapes`` come from :func:`onnxslim_bn.shapes.infer_shapes` with fixed inputs."""
    inits = {t.name: t for t in model.graph.initializer}
    params = sum(int(np.prod(t.dims)) for t in inits.values())
    for node in model.graph.node:
        if node.op_type == "Constant":
            for a in node.attribute:
                if a.name == "value":
                    params += int(np.prod(a.t.dims))
    layers, channels, macs = {}, 0, 0
    for node in model.graph.node:
        if node.op_type not in _WEIGHTED or len(node.input) < 2 or node.input[1] not in inits:
            continue
        w = list(inits[node.input[1]].dims)
        out_shape = shapes.get(node.output[0]) or []
        out_n = _static_prod(out_shape)
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type == "Conv":
            out_c = w[0]
            per_out = int(np.prod(w[1:]))  # (C_in / group) * kernel
            layer_macs = out_n * per_out
        elif node.op_type == "ConvTranspose":
            group = attrs.get("group", 1)
            out_c = w[1] * group
            in_shape = shapes.get(node.input[0]) or []
            layer_macs = _static_prod(in_shape) * int(np.prod(w[1:]))
        else:
            trans_b = node.op_type == "Gemm" and attrs.get("transB", 0)
            out_c = w[0] if trans_b else w[1]
            k = w[1] if trans_b else w[0]
            layer_macs = out_n * k
        channels += out_c
        macs += layer_macs
        layers[node.name] = {"op": node.op_type, "out_channels": out_c, "macs": layer_macs}
    return Metrics(channels, params, macs, size_bytes if size_bytes is not None else weight_bytes(model),
                   dict(Counter(n.op_type for n in model.graph.node)), layers)


def _static_prod(shape: list) -> int:
    n = 1
    for d in shape:
        if not isinstance(d, int):
            return 0
        n *= d
    return n


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers, without serializing the model (ByteSize() would, in full)."""
    total = 0
    for t in model.graph.initializer:
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type else np.dtype(np.float32)
        total += int(np.prod(t.dims)) * dtype.itemsize
    return total

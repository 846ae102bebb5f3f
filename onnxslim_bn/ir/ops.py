"""The ONNX ops the IR layer acts on itself: one fact each, in one place.

Reading a model's constants (a Constant node's value, an initializer behind an Identity or a
storage Cast), constant folding and shape arithmetic (Shape, CastLike, sequence splits), the bias
Add a layer without a bias input gets, and the quantization ops. This is IR knowledge, not a
channel rule: ``ir/`` sits below ``rules/`` and may not import it, and the passes that work on
``onnx.ModelProto`` (reconstruction, the check, latency, quantization) read these facts here too.
The channel behaviour of every op lives in ``rules/``.
"""

from __future__ import annotations

import onnx

CONSTANT = "Constant"  # holds its value as an attribute: ``value``, or one of fold.CONSTANT_ATTRS
IDENTITY = "Identity"  # its output is its input
CAST = "Cast"  # its input converted to type ``to``: a float constant behind it is stored narrower
SHAPE = "Shape"  # reads only its input's shape (attributes ``start``, ``end``)
CAST_LIKE = "CastLike"  # reads only the type of its second input
SPLIT_TO_SEQUENCE = "SplitToSequence"  # with SEQUENCE_AT picks at constant indices: a plain Split
SEQUENCE_AT = "SequenceAt"
BIAS_ADD = "Add"  # ``output + constant``: the bias behind a layer with no bias input (MatMul)
QUANTIZE = "QuantizeLinear"
DEQUANTIZE = "DequantizeLinear"
QDQ = frozenset({QUANTIZE, DEQUANTIZE})
# integer kernels (QOperator format): a model holding one is quantized and cannot be pruned (QDQ can);
# the QLinear* family of com.microsoft (QLinearAdd, QLinearGlobalAveragePool, ...) too, by prefix
QOPERATOR = frozenset({"QLinearConv", "QLinearMatMul", "ConvInteger", "MatMulInteger", "QGemm", "DynamicQuantizeLinear"})
QOPERATOR_PREFIX = "QLinear"
INT8 = QDQ | QOPERATOR  # a model holding one is quantized
UNCHANGED = frozenset({IDENTITY, CAST})  # outputs the input's values (in another type at most)


def constant_tensor(node: onnx.NodeProto) -> onnx.TensorProto | None:
    """The tensor a ``Constant`` node holds as its ``value``; None for other nodes and forms."""
    if node.op_type != CONSTANT or not node.attribute or node.attribute[0].name != "value":
        return None
    return node.attribute[0].t


def constant_names(model: onnx.ModelProto, storage: bool = False) -> set[str]:
    """Names of the model's constants: initializers and Constant outputs; with ``storage``,
    also the outputs of a ``Cast`` of one (fp16 storage)."""
    names = {t.name for t in model.graph.initializer}
    names |= {o for n in model.graph.node if n.op_type == CONSTANT for o in n.output}
    if storage:
        names |= set(storage_casts(model, names))
    return names


def storage_casts(model: onnx.ModelProto, constants) -> dict[str, onnx.NodeProto]:
    """The ``Cast`` nodes that read one of ``constants`` (a weight stored in another type), by output."""
    return {n.output[0]: n for n in model.graph.node if n.op_type == CAST and n.input[0] in constants}

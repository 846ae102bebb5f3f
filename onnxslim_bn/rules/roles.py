"""What an op is to the stages that read the graph around a layer: one table, beside the rules.

Scale recovery (:mod:`onnxslim_bn.passes.importance`) tells a folded or split BatchNorm by the
ops around a layer: a per-channel Mul or Add after it, the activation it goes into, whether the
exporter kept BatchNormalization nodes elsewhere; the report names a layer by its weight, read
through a storage Cast; the check (:func:`onnxslim_bn.passes.verify.class_axis`) asks along which
axis an output's last op normalises, to tell class scores from other outputs. They test these
roles, not op names.
"""

from __future__ import annotations

NORMALIZATION = frozenset({"BatchNormalization"})
# a per-channel Mul after a layer: a split BN's scale; also the product of x * Sigmoid(x) (SiLU)
SCALE = frozenset({"Mul"})
# a per-channel Add of a constant after a layer: its bias, written apart
BIAS = frozenset({"Add"})
# the activations a folded Conv-BN-Act block ends in; Sigmoid / HardSigmoid alone are gates or
# output squashes (x * Sigmoid(x) and x * HardSigmoid(x) are SiLU and HardSwish, and count)
ACTIVATIONS = frozenset({"Relu", "LeakyRelu", "PRelu", "Clip", "HardSwish", "Elu", "Selu", "Celu", "Gelu", "Mish",
                         "Softplus", "ThresholdedRelu"})
GATES = frozenset({"Sigmoid", "HardSigmoid"})
# ops that pass a tensor on unchanged in value (a QDQ model's activation pairs: up to their rounding)
PASSING = frozenset({"Identity", "Dropout", "Cast", "QuantizeLinear", "DequantizeLinear"})
CASTS = frozenset({"Cast"})  # of an initializer: the type a weight is stored in (fold.restore_storage)
# a QDQ model's activation quantizer: with its zero point at the bottom of its type's range it
# clips at zero, a ReLU the quantizer absorbed (onnxruntime's QDQ quantizer drops the Relu so)
QUANTIZERS = frozenset({"QuantizeLinear"})
JOINS = frozenset({"Add", "Sum"})  # residual joins of two computed tensors
SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})  # normalise along their ``axis`` attribute
SOFTMAX_LAST_AXIS_OPSET = 13  # from this opset on that axis defaults to -1 (the last), before it to 1

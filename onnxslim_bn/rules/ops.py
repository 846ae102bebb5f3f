"""Op facts the passes read beyond channel spaces: one table, kept with the rules.

The check (:func:`onnxslim_bn.passes.verify.class_axis`) asks along which axis an output's last
op works, to tell class scores from other outputs.
"""

SOFTMAX_OPS = frozenset({"Softmax", "LogSoftmax"})  # normalise along their ``axis`` attribute
SOFTMAX_LAST_AXIS_OPSET = 13  # from this opset on that axis defaults to -1 (the last), before it to 1

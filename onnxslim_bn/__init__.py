"""onnx-bnslim: Network Slimming on exported ONNX graphs.

>>> import onnxslim_bn
>>> result = onnxslim_bn.prune("model.onnx", ratio=0.5)   # doctest: +SKIP
>>> print(result.report.table())                          # doctest: +SKIP
"""

from .app.api import InspectResult, PruneResult, inspect, prune, to_openvino
from .errors import BnSlimError, CheckFailed
from .ir.model_io import load_model, save_model
from .options import PruneOptions
from .version import __version__

__all__ = ["BnSlimError", "CheckFailed", "InspectResult", "PruneOptions", "PruneResult", "inspect", "load_model", "prune", "save_model", "to_openvino", "__version__"]

"""Proof on every run: checker, shape inference, and onnxruntime numbers against the original."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from .errors import BnSlimError
from .model_io import as_file, too_large_for_protobuf
from .shapes import graph_inputs

log = logging.getLogger(__name__)

_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
}


@dataclass
class OutputCheck:
    name: str
    shape: list[int]
    max_abs_diff: float
    max_abs_value: float  # of the original output, to put max |diff| in scale
    cosine: float
    top1_agreement: float | None  # for [batch, classes] outputs: argmax agreement


@dataclass
class Verification:
    inputs: str  # where the inputs came from
    outputs: list[OutputCheck]

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    def to_dict(self) -> dict:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff, "cosine": self.cosine}


def session(model: onnx.ModelProto, what: str, extra_outputs: list[str] = ()):
    """An onnxruntime CPU session for a model held in memory, with intermediate tensors as
    ``extra_outputs`` if asked (the model is left exactly as it was).

    Graph optimizations are off: the check runs the graph as written, and on a 1 GB model
    onnxruntime's optimizer alone costs 9 s and 3 GB (bench uses full optimizations)."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    known = {o.name for o in model.graph.output}
    added = [onnx.helper.make_empty_tensor_value_info(n) for n in extra_outputs if n not in known]
    model.graph.output.extend(added)
    try:
        if not too_large_for_protobuf(model):
            return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
        with as_file(model) as path:  # over 2 GB: from a file with external data
            return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise BnSlimError(f"{what}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from exc
    finally:
        for _ in added:
            model.graph.output.pop()


def check_model(model: onnx.ModelProto, what: str) -> None:
    """onnx.checker with full (strict shape inference) checks."""
    try:
        if too_large_for_protobuf(model):
            with as_file(model) as path:
                onnx.checker.check_model(str(path), full_check=True)
        else:
            onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise BnSlimError(f"{what}: the ONNX checker rejects it ({str(exc).splitlines()[0]})") from exc


CALIBRATION_BATCH = 16


def make_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], data: str | None, seed: int,
                calibration: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """Inputs for the comparison: the user's .npz, or seeded standard-normal noise.

    For ``calibration`` (activation statistics) noise comes in 16 samples or more (whole
    batches when the model's batch size is fixed).
    """
    inputs = graph_inputs(model)
    if data:
        path = Path(data)
        try:
            archive = np.load(path)
        except (OSError, ValueError) as exc:
            raise BnSlimError(f"{path}: cannot read it as .npz ({exc}); save inputs with numpy.savez(path, input_name=array)") from exc
        feeds = {}
        for value in inputs:
            if value.name not in archive.files:
                raise BnSlimError(f"{path}: has no array '{value.name}' (it has {archive.files}); name the arrays after the model inputs")
            dtype = _NUMPY.get(value.type.tensor_type.elem_type, np.float32)
            feeds[value.name] = archive[value.name].astype(dtype)
        return feeds, f"{path.name} ({', '.join(f'{k}: {list(v.shape)}' for k, v in feeds.items())})"
    rng = np.random.default_rng(seed)
    feeds = {}
    for value in inputs:
        dtype = _NUMPY.get(value.type.tensor_type.elem_type)
        if dtype is None or not np.issubdtype(dtype, np.floating):
            raise BnSlimError(f"input '{value.name}' is not a float tensor: pass real inputs with --data inputs.npz")
        shape = list(shapes[value.name])
        if calibration and shape:  # whole batches of the model's own batch size
            step = static_batch(model) or CALIBRATION_BATCH
            shape[0] = step * -(-CALIBRATION_BATCH // step)
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds, "seeded random normal " + ", ".join(f"{k}: {list(v.shape)}" for k, v in feeds.items())


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size of the model's inputs, or None when it is dynamic."""
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def run(sess, feeds: dict[str, np.ndarray], batch: int | None, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run a session (all outputs, or the named ones), in chunks of ``batch`` along the batch
    axis: the model's fixed batch size, or 256 at a time when it is dynamic."""
    batch = batch or 256
    n = min(len(v) for v in feeds.values()) if feeds else 0
    if n <= batch:
        return sess.run(outputs, feeds)
    chunks = [sess.run(outputs, {k: v[i : i + batch] for k, v in feeds.items()}) for i in range(0, n, batch)]
    return [np.concatenate(parts) for parts in zip(*chunks)]


def compare(names: list[str], before: list[np.ndarray], after: list[np.ndarray], inputs: str, what: str) -> Verification:
    checks = []
    for name, a, b in zip(names, before, after):
        if a.shape != b.shape:
            raise BnSlimError(f"{what}: output '{name}' changed shape {list(a.shape)} -> {list(b.shape)}; "
                              "this is a bug in onnx-bnslim, please report it with the model")
        a64, b64 = a.astype(np.float64).ravel(), b.astype(np.float64).ravel()
        denom = np.linalg.norm(a64) * np.linalg.norm(b64)
        cosine = float(a64 @ b64 / denom) if denom > 0 else float(np.array_equal(a64, b64))
        top1 = float((a.argmax(-1) == b.argmax(-1)).mean()) if a.ndim == 2 and a.shape[1] > 1 else None
        checks.append(OutputCheck(name, list(a.shape), float(np.max(np.abs(a64 - b64), initial=0.0)),
                                  float(np.max(np.abs(a64), initial=0.0)), cosine, top1))
    return Verification(inputs, checks)

"""Proof on every run: checker, shape inference, and onnxruntime numbers against the original.

What the check compares, on what
--------------------------------
Inputs: with data, the check's share of it (:func:`onnxslim_bn.ir.data.split`: disjoint from the
calibration samples). Without, ``CHECK_SAMPLES`` (32) seeded samples per input drawn from the
standard normal N(0, 1), rounded up to whole batches when the model fixes its batch size, from
a random stream apart from the calibration's; integer and bool inputs need data. A fixed batch
size B is fed in chunks of B; a last partial chunk is padded with copies of its last sample and
the padding's outputs are dropped.

Per output, over the positions where both models give finite values:

- ``max_abs_diff`` = max |pruned - original|;
- ``max_rel_diff`` = max_abs_diff / max |original| (one scale per output: logits and maps alike
  are judged against their own range);
- ``cosine`` of the flattened outputs;
- ``top1_agreement``, only for class scores: 2-D ``[N, K]`` outputs (class axis 1), and 3-D
  ``[N, T, K]`` sequences whose last op works along the last axis (Softmax / LogSoftmax over it,
  MatMul / Gemm, or a bias Add after a MatMul): argmax over the class axis, agreement over every
  sample (and sequence position), K > 1;
- non-finite values are compared position by position: NaN, +Inf and -Inf must sit at the
  same positions in both models, else the check fails whatever the gates;
- ``near_constant``: the standard deviation of the original's finite values over all samples
  and positions is at most ``NEAR_CONSTANT`` (1e-3) x max(1, max |original|): such an output is not
  exercised by these inputs (a text detector on noise), so agreement on it proves little.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass, field

import numpy as np
import onnx

from ..errors import BnSlimError
from ..ir import data, runtime
from ..ir.model_io import as_file, too_large_for_protobuf
from ..ir.ops import BIAS_ADD, UNCHANGED, constant_names
from ..ir.shapes import graph_inputs
from ..ir.weights import FEATURE_OPS, LAYER_OPS, UNBIASED_OPS
from ..rules.roles import SOFTMAX_LAST_AXIS_OPSET, SOFTMAX_OPS

log = logging.getLogger(__name__)

_NUMPY = {
    onnx.TensorProto.FLOAT: np.float32, onnx.TensorProto.FLOAT16: np.float16, onnx.TensorProto.DOUBLE: np.float64,
    onnx.TensorProto.INT64: np.int64, onnx.TensorProto.INT32: np.int32, onnx.TensorProto.BOOL: np.bool_,
}


@dataclass
class OutputCheck:
    name: str
    shape: list[int]  # of the compared outputs, all samples
    samples: int
    max_abs_diff: float
    max_abs_value: float  # of the original output, to put max |diff| in scale
    max_rel_diff: float  # max |diff| / max |original|
    cosine: float
    top1_agreement: float | None  # class-like outputs only (see the module doc)
    top1_positions: int = 0  # argmax comparisons behind top1_agreement (samples x sequence positions)
    nonfinite: int = 0  # positions non-finite in both models, alike (left out of the metrics)
    nonfinite_mismatch: int = 0  # positions finite in one model and not the other, or NaN vs Inf
    near_constant: bool = False


@dataclass
class Verification:
    inputs: str  # where the check's inputs came from, e.g. "32 seeded N(0,1) samples, not used for calibration"
    outputs: list[OutputCheck]
    samples: int = 0
    random: bool = True  # seeded inputs rather than data
    calibration_samples: int = 0  # samples the calibration used (0: no calibration ran)
    disjoint: bool = True  # check samples not used for calibration
    notes: list[str] = field(default_factory=list)
    failed: str | None = None  # why the check failed (a gate, or NaN/Inf where the original has none)

    @property
    def max_abs_diff(self) -> float:
        return max((o.max_abs_diff for o in self.outputs), default=0.0)

    @property
    def max_rel_diff(self) -> float:
        return max((o.max_rel_diff for o in self.outputs), default=0.0)

    @property
    def cosine(self) -> float:
        return min((o.cosine for o in self.outputs), default=1.0)

    @property
    def top1_agreement(self) -> float | None:
        return min((o.top1_agreement for o in self.outputs if o.top1_agreement is not None), default=None)

    def gate(self, max_error: float | None = None, min_cosine: float | None = None,
             max_rel_error: float | None = None) -> str | None:
        """Why the check fails (every reason, joined), or None. Comparisons are written so that
        a NaN metric fails: ``not (x <= limit)``."""
        reasons = []
        for o in self.outputs:
            if o.nonfinite_mismatch:
                reasons.append(f"output '{o.name}' is NaN/Inf at {o.nonfinite_mismatch} positions where the other "
                               "model differs (finite, or another kind)")
            if max_error is not None and not o.max_abs_diff <= max_error:
                reasons.append(f"output '{o.name}': max |pruned - original| = {o.max_abs_diff:.3g} "
                               f"exceeds --max-error {max_error:g}")
            if max_rel_error is not None and not o.max_rel_diff <= max_rel_error:
                reasons.append(f"output '{o.name}': max relative diff {o.max_rel_diff:.3g} "
                               f"exceeds --max-rel-error {max_rel_error:g}")
            if min_cosine is not None and not o.cosine >= min_cosine:
                reasons.append(f"output '{o.name}': cosine {o.cosine:.6f} is below --min-cosine {min_cosine:g}")
        return "; ".join(reasons) or None

    def to_dict(self) -> dict:
        return {**asdict(self), "max_abs_diff": self.max_abs_diff, "max_rel_diff": self.max_rel_diff,
                "cosine": self.cosine, "top1_agreement": self.top1_agreement}


def open_layer_shapes(model: onnx.ModelProto, shapes: dict[str, list]) -> tuple[list[str], list[str]]:
    """(layers, tensors): the layers with a constant weight whose input or output shape inference
    left open (a ``Resize`` sized from an input's values), and those tensors."""
    consts = constant_names(model, storage=True)  # fp16 storage behind a Cast too
    inputs = {i.name for i in model.graph.input}
    layers, tensors = [], []
    for node in model.graph.node:
        if node.op_type not in LAYER_OPS or len(node.input) < 2 or node.input[1] not in consts:
            continue
        open_ = [t for t in (node.input[0], node.output[0]) if t and not _static(shapes.get(t))]
        if open_:
            layers.append(node.name or node.output[0])
            tensors.extend(t for t in open_ if t not in inputs and t not in tensors)
    return layers, tensors


def concrete_shapes(model: onnx.ModelProto, tensors: list[str], feeds: dict[str, np.ndarray],
                    what: str) -> dict[str, list[int]]:
    """The shapes ``tensors`` take in one onnxruntime run of ``model`` on ``feeds``."""
    if not tensors:
        return {}
    sess = runtime.session(model, what, extra_outputs=tensors)
    try:
        outs = sess.run(tensors, feeds)
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise BnSlimError(f"{what}: onnxruntime fails on the inputs that were to count its layers' shapes "
                          f"({str(exc).splitlines()[0]}); check --data and --input-shapes") from exc
    return {name: [int(d) for d in out.shape] for name, out in zip(tensors, outs)}


def _static(dims: list | None) -> bool:
    return dims is not None and all(isinstance(d, int) and d >= 0 for d in dims)


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


CHECK_SAMPLES = data.CHECK_SAMPLES  # seeded check samples without data
CALIBRATION_BATCH = 16  # seeded calibration samples without data
NEAR_CONSTANT = 1e-3  # see the module doc


def random_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], seed: int, samples: int | None = None,
                  stream: int = 0) -> dict[str, np.ndarray]:
    """Seeded standard-normal inputs of ``shapes`` (axis 0 set to ``samples`` when given).

    ``stream`` 0 is ``default_rng(seed)``; another stream draws from ``default_rng([seed, stream])``,
    independent of it (the check uses stream 1, the calibration stream 0)."""
    rng = np.random.default_rng(seed if stream == 0 else [seed, stream])
    feeds = {}
    for value in graph_inputs(model):
        dtype = _NUMPY.get(value.type.tensor_type.elem_type)
        if dtype is None or not np.issubdtype(dtype, np.floating):
            kind = onnx.TensorProto.DataType.Name(value.type.tensor_type.elem_type).lower()
            raise BnSlimError(f"input '{value.name}' is a {kind} tensor, which N(0,1) noise cannot stand for: "
                              f"pass real inputs with --data (an .npz with an array '{value.name}')")
        shape = list(shapes[value.name])
        if samples is not None and shape:
            shape[0] = samples
        feeds[value.name] = rng.standard_normal(shape).astype(dtype)
    return feeds


def make_inputs(model: onnx.ModelProto, shapes: dict[str, list[int]], data: None, seed: int,
                calibration: bool = False) -> tuple[dict[str, np.ndarray], str]:
    """Seeded standard-normal inputs of exactly ``shapes`` (bench), or for ``calibration`` 16
    samples or more (whole batches when the model's batch size is fixed). Data goes through
    :mod:`onnxslim_bn.ir.data`."""
    if data is not None:
        raise ValueError("make_inputs draws seeded inputs; read data with onnxslim_bn.ir.data.load")
    samples = None
    if calibration:
        step = static_batch(model) or CALIBRATION_BATCH
        samples = step * -(-CALIBRATION_BATCH // step)
    feeds = random_inputs(model, shapes, seed, samples)
    return feeds, "seeded random normal " + ", ".join(f"{k}: {list(v.shape)}" for k, v in feeds.items())


def check_sample_count(model: onnx.ModelProto, wanted: int = CHECK_SAMPLES) -> int:
    """``wanted`` rounded up to whole batches of the model's fixed batch size."""
    step = static_batch(model) or 1
    return step * -(-wanted // step)


def static_batch(model: onnx.ModelProto) -> int | None:
    """The fixed batch size of the model's inputs, or None when it is dynamic."""
    for value in graph_inputs(model):
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def padding_note(count: int, batch: int | None, what: str) -> str | None:
    """The note for ``count`` samples run in fixed batches of ``batch``, when the last is partial."""
    if not batch or count % batch == 0:
        return None
    return (f"the model's batch size is fixed at {batch}: the last {count % batch} of the {count} {what} samples were "
            f"padded to a whole batch with copies of the last one (their outputs are dropped)")


def class_axis(model: onnx.ModelProto, name: str, rank: int) -> int | None:
    """The class axis of output ``name`` when it looks like class scores (see the module doc)."""
    if rank == 2:
        return 1
    if rank != 3:
        return None
    producers = {o: n for n in model.graph.node for o in n.output}
    node = producers.get(name)
    while node is not None and node.op_type in UNCHANGED:
        node = producers.get(node.input[0])
    if node is None:
        return None
    if node.op_type in SOFTMAX_OPS:
        opset = next((o.version for o in model.opset_import if o.domain in ("", "ai.onnx")), SOFTMAX_LAST_AXIS_OPSET)
        axis = next((a.i for a in node.attribute if a.name == "axis"), -1 if opset >= SOFTMAX_LAST_AXIS_OPSET else 1)
        return 2 if axis in (-1, 2) else None
    if node.op_type in FEATURE_OPS:
        return 2
    if node.op_type == BIAS_ADD and any(i in producers and producers[i].op_type in UNBIASED_OPS for i in node.input):
        return 2
    return None


def _kinds(a: np.ndarray) -> np.ndarray:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf, per position."""
    kinds = np.zeros(a.shape, np.int8)
    if np.issubdtype(a.dtype, np.floating):
        kinds[np.isnan(a)] = 1
        kinds[np.isposinf(a)] = 2
        kinds[np.isneginf(a)] = 3
    return kinds


def compare_output(name: str, a: np.ndarray, b: np.ndarray, samples: int, axis: int | None) -> OutputCheck:
    """The metrics of the module doc for one output: ``a`` the original's, ``b`` the pruned model's."""
    ka, kb = _kinds(a), _kinds(b)
    finite = (ka == 0) & (kb == 0)
    x, y = a[finite].astype(np.float64), b[finite].astype(np.float64)
    diff = float(np.max(np.abs(x - y), initial=0.0))
    scale = float(np.max(np.abs(x), initial=0.0))
    rel = diff / scale if scale > 0 else (0.0 if diff == 0 else float("inf"))
    denom = np.linalg.norm(x) * np.linalg.norm(y)
    cosine = float(x @ y / denom) if denom > 0 else float(np.array_equal(x, y))
    top1, positions = None, 0
    if axis is not None and a.shape[axis] > 1:
        picks_a, picks_b = a.argmax(axis), b.argmax(axis)
        top1, positions = float((picks_a == picks_b).mean()), int(picks_a.size)
    near = bool(x.size) and float(x.std()) <= NEAR_CONSTANT * max(1.0, scale)
    return OutputCheck(name, list(a.shape), samples, diff, scale, rel, cosine, top1, positions,
                       nonfinite=int(np.count_nonzero((ka != 0) & (ka == kb))),
                       nonfinite_mismatch=int(np.count_nonzero(ka != kb)), near_constant=near)


def compare(model: onnx.ModelProto, names: list[str], before: list[np.ndarray], after: list[np.ndarray],
            samples: int, inputs: str, what: str) -> Verification:
    """Compare every output of the original (``before``) and pruned (``after``) models."""
    checks = []
    for name, a, b in zip(names, before, after):
        if a.shape != b.shape:
            raise BnSlimError(f"{what}: output '{name}' changed shape {list(a.shape)} -> {list(b.shape)}; "
                              "this is a bug in onnx-bnslim, please report it with the model")
        checks.append(compare_output(name, a, b, samples, class_axis(model, name, a.ndim)))
    return Verification(inputs, checks, samples=samples)

"""INT8 after pruning: onnxruntime's static quantization of the pruned model, calibrated on the
calibration share of ``--data`` (never the check's), with the original's interface.

What is done, and why
---------------------
- ``onnxruntime.quantization.quant_pre_process`` (shape inference, onnxruntime's basic graph
  optimizations: BN folded into the Conv before its weights are quantized), then
  ``quantize_static`` in the **QDQ** format: every quantized tensor is a QuantizeLinear /
  DequantizeLinear pair in an ordinary ONNX graph, which onnxruntime fuses into INT8 kernels and
  OpenVINO reads as its own INT8 (FakeQuantize) graph.
- Weights **int8, per output channel** (symmetric, one scale per channel): per-tensor scales let
  one large channel crush the resolution of the others, and pruned layers keep uneven channels.
- Activations **uint8** (U8S8) on x86: the INT8 dot-product instructions of x86 CPUs (AVX2
  ``VPMADDUBSW``, AVX-512 / AVX ``VNNI`` ``VPDPBUSD``) multiply an *unsigned* 8-bit operand by a
  *signed* one, so u8 activations times s8 weights feed them directly; s8 activations would have
  to be shifted to u8 (zero point + 128) before every such product. Without VNNI, ``VPMADDUBSW`` adds pairs of u8 x s8
  products into int16 and can saturate: there the weights use 7 bits (``reduce_range``), as
  onnxruntime's documentation advises. On other CPUs (ARM) activations are int8 (S8S8), the
  format ARM's ``SDOT`` takes.
- Calibration: MinMax over the calibration samples, in batches of :data:`CALIBRATION_BATCH`
  (the model's own batch size when it fixes one, the last batch padded).
- The result keeps the original's interface: input and output names, element types and shapes
  (dynamic dims as named dims); the pre-processing's extra opset domains that no node uses are
  dropped, the model's metadata kept.
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import BnSlimError
from ..hardware import cpu_features
from ..ir import data as data_module
from ..ir import runtime
from ..ir.model_io import _save_external, load_model, save_model, too_large_for_protobuf
from ..ir.ops import DEQUANTIZE, INT8, QDQ, QOPERATOR, QOPERATOR_PREFIX, QUANTIZE
from ..ir.shapes import resolve_input_shapes
from ..options import QUANTIZE_MODES as MODES
from ..options import QUANTIZE_NEEDS_DATA as NEEDS_DATA
from .verify import static_batch

log = logging.getLogger(__name__)

CALIBRATION_BATCH = 16



@dataclass(frozen=True)
class Settings:
    """How the model was quantized (the report's ``quantization.settings``)."""

    format: str = "QDQ"
    activations: str = "uint8"
    weights: str = "int8"
    per_channel: bool = True
    reduce_range: bool = False
    calibration: str = "MinMax"
    reason: str = ""

    def to_dict(self) -> dict:
        return {"format": self.format, "activations": self.activations, "weights": self.weights,
                "per_channel": self.per_channel, "reduce_range": self.reduce_range,
                "calibration": self.calibration, "reason": self.reason}


@dataclass
class Quantized:
    model: onnx.ModelProto
    settings: Settings
    calibration_samples: int
    excluded: list[str] = field(default_factory=list)  # nodes left in FP32 (nodes_to_exclude)
    seconds: float = 0.0
    prepared: onnx.ModelProto | None = None  # the FP32 model as quantized (after quant_pre_process)
    sensitivity: object | None = None  # the Sensitivity that chose ``excluded``, when one ran


def settings_for_cpu(cpuinfo: str | None = None, machine: str | None = None) -> Settings:
    """The activation type that suits this CPU's INT8 instructions (see the module doc)."""
    machine, flags = cpu_features(cpuinfo, machine)
    if machine.startswith(("arm", "aarch64")) or "asimd" in flags:
        return Settings(activations="int8", reason="ARM: SDOT multiplies signed by signed 8-bit values (S8S8)")
    vnni = bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags)
    if vnni:
        return Settings(reason="x86 with VNNI: VPDPBUSD multiplies unsigned 8-bit activations by signed 8-bit "
                               "weights (U8S8) without saturation")
    return Settings(reduce_range=True,
                    reason="x86 without VNNI: VPMADDUBSW takes u8 activations x s8 weights (U8S8); its int16 "
                           "pair sums can saturate, so the weights use 7 bits (reduce_range)")


def calibration_batches(arrays: dict[str, np.ndarray], batch: int | None, step: int | None = None
                        ) -> list[dict[str, np.ndarray]]:
    """``arrays`` (samples on axis 0) in batches of ``batch`` (the model's static batch size: the
    last batch padded with copies of its last sample) or, when the batch is dynamic, of ``step``
    (default :data:`CALIBRATION_BATCH`; the last one short)."""
    n = min(len(v) for v in arrays.values())
    step = batch or step or CALIBRATION_BATCH
    out = []
    for i in range(0, n, step):
        part = {k: v[i : i + step] for k, v in arrays.items()}
        short = step - len(next(iter(part.values())))
        if batch and short:  # a fixed batch size: pad the last batch with copies of its last sample
            part = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in part.items()}
        out.append(part)
    return out


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over arrays, batch by batch."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int | None):
        self.batches = calibration_batches(arrays, batch)
        self.position = 0

    def get_next(self) -> dict[str, np.ndarray] | None:
        if self.position >= len(self.batches):
            return None
        self.position += 1
        return self.batches[self.position - 1]

    def rewind(self) -> None:
        self.position = 0


def quantize(model: onnx.ModelProto, calibration: dict[str, np.ndarray], source: str,
             exclude: Sequence[str] = (), settings: Settings | None = None, batch: int | None = None) -> Quantized:
    """``model`` as an INT8 QDQ model calibrated on ``calibration`` (arrays per input, samples on
    axis 0); ``exclude``: node names left in FP32. ``model`` is not modified."""
    if not calibration or min(len(v) for v in calibration.values()) == 0:
        raise BnSlimError(f"{source}: {NEEDS_DATA}")
    from onnxruntime.quantization import QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    settings = settings or settings_for_cpu()
    clock = time.perf_counter()
    activation = QuantType.QUInt8 if settings.activations == "uint8" else QuantType.QInt8
    external = too_large_for_protobuf(model)
    with tempfile.TemporaryDirectory(prefix="onnx-bnslim-int8-") as tmp:
        fp32, pre, out = (Path(tmp) / f for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        _save_external(model, fp32) if external else fp32.write_bytes(model.SerializeToString())
        try:
            quant_pre_process(str(fp32), str(pre), save_as_external_data=external)
            prepared = onnx.load(str(pre))
            names = {n.name for n in prepared.graph.node}
            unknown = [n for n in exclude if n not in names]
            if unknown:
                raise BnSlimError(f"{source}: cannot keep node '{unknown[0]}' in FP32: the model has no node of that name")
            quantize_static(str(pre), str(out), _Reader(calibration, batch), quant_format=QuantFormat.QDQ,
                            per_channel=settings.per_channel, reduce_range=settings.reduce_range,
                            activation_type=activation, weight_type=QuantType.QInt8,
                            nodes_to_exclude=list(exclude), use_external_data_format=external)
        except BnSlimError:
            raise
        except Exception as exc:  # onnxruntime.quantization raises plain and runtime exception types
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise BnSlimError(f"{source}: onnxruntime's INT8 quantization failed ({first}); drop --quantize or "
                              "report the model") from exc
        quantized = onnx.load(str(out))
    restore_interface(quantized, model, source)
    return Quantized(quantized, settings, min(len(v) for v in calibration.values()), list(exclude),
                     time.perf_counter() - clock, prepared)


# ---------------------------------------------------------------- layers kept in FP32 by sensitivity

SENSITIVITY_SAMPLES = 64  # calibration samples the per-layer sensitivity runs on
SMALL_ERROR = 0.01  # relative L2 error of INT8 against FP32 (calibration samples) below which nothing is kept FP32
DOMINANT = 0.2  # a layer whose FP32 copy removes at least this share of that error dominates it
MAX_FP32 = 4  # nodes kept in FP32 at most
LATER_ROUNDS = 8  # after the first round, the search tries this many of its best nodes only
LARGE_MODEL = 16 << 20  # weights above this (bytes): the search runs on a quarter of the samples


@dataclass
class Sensitivity:
    """Per quantized node (first round): the INT8 model's error against the FP32 model with that
    node's inputs left unquantized (relative L2 of the outputs, on calibration samples), against
    ``error`` (all quantized). ``removed`` = error - error without it; ``chosen``: the nodes kept
    in FP32, in the order the greedy search took them."""

    error: float
    per_node: dict[str, float] = field(default_factory=dict)  # node -> error with that node in FP32
    chosen: list[str] = field(default_factory=list)
    error_after: float | None = None  # with ``chosen`` in FP32
    rounds: list[dict] = field(default_factory=list)  # per chosen node: the error once it was kept in FP32
    samples: int = 0
    seconds: float = 0.0

    def removed(self, node: str) -> float:
        return self.error - self.per_node[node]

    def to_dict(self) -> dict:
        top = sorted(self.per_node, key=self.removed, reverse=True)[:5]
        return {"error": self.error, "error_after": self.error_after, "chosen": self.chosen, "rounds": self.rounds,
                "samples": self.samples,
                "most_sensitive": [{"node": n, "error_without": self.per_node[n], "share": self.removed(n) / self.error
                                    if self.error > 0 else 0.0} for n in top], "seconds": self.seconds}


def _relative_error(got: list[np.ndarray], want: list[np.ndarray]) -> float:
    return max(float(np.linalg.norm((g - w).astype(np.float64)) / max(np.linalg.norm(w.astype(np.float64)), 1e-30))
               for g, w in zip(got, want))


def _ort_run(model: onnx.ModelProto, feeds: dict[str, np.ndarray], batch: int | None) -> list[np.ndarray]:
    return runtime.run(runtime.session(model, "sensitivity", optimized=True), feeds, batch)


def _fp32_nodes(quantized: onnx.ModelProto, prepared: onnx.ModelProto, nodes: Sequence[str]) -> onnx.ModelProto | None:
    """``quantized`` with the inputs of ``nodes`` taken from before their QDQ pairs: activations from
    the QuantizeLinear's input, weights and biases from the prepared FP32 model; QDQ nodes and
    constants nothing reads any more are dropped. None when the nodes read nothing quantized."""
    variant = onnx.ModelProto()
    variant.CopyFrom(quantized)
    producer = {o: n for n in variant.graph.node for o in n.output}
    inits = {t.name for t in variant.graph.initializer}
    floats = {t.name: t for t in prepared.graph.initializer}
    changed = False
    for target in [n for n in variant.graph.node if n.name in set(nodes)]:
        for i, name in enumerate(list(target.input)):
            dq = producer.get(name)
            if dq is None or dq.op_type != DEQUANTIZE:
                continue
            source = dq.input[0]
            if source in inits:  # a quantized constant: its float original
                original = floats.get(source.removesuffix("_quantized"))
                if original is None:
                    continue
                fresh = f"{original.name}__fp32"  # the DQ's output may carry the original's name
                if fresh not in inits:
                    copy = onnx.TensorProto()
                    copy.CopyFrom(original)
                    copy.name = fresh
                    variant.graph.initializer.append(copy)
                    inits.add(fresh)
                target.input[i] = fresh
                changed = True
            elif producer.get(source) is not None and producer[source].op_type == QUANTIZE:
                target.input[i] = producer[source].input[0]
                changed = True
    if not changed:
        return None
    _drop_unused(variant)
    return variant


def _drop_unused(model: onnx.ModelProto) -> None:
    """Remove Q/DQ nodes whose outputs nothing reads, then initializers nothing reads."""
    graph = model.graph
    outputs = {o.name for o in graph.output}
    while True:
        read = {i for n in graph.node for i in n.input} | outputs
        dead = [n for n in graph.node if n.op_type in QDQ
                and not any(o in read for o in n.output)]
        if not dead:
            break
        for n in dead:
            graph.node.remove(n)
    read = {i for n in graph.node for i in n.input} | outputs
    kept = [t for t in graph.initializer if t.name in read]
    del graph.initializer[:]
    graph.initializer.extend(kept)


def sensitivity(fp32: onnx.ModelProto, quantized: Quantized, calibration: dict[str, np.ndarray],
                batch: int | None = None, limit: int = MAX_FP32) -> tuple[Sensitivity, onnx.ModelProto | None]:
    """Which nodes' quantization dominates the INT8 model's error against ``fp32`` on (up to
    :data:`SENSITIVITY_SAMPLES` of) the calibration samples, greedily: each quantized node in turn
    is given its FP32 inputs; the one that lowers the error most is kept in FP32 when it removes
    at least :data:`DOMINANT` of it, and the search starts again from there, until no node
    dominates, the error is below :data:`SMALL_ERROR`, or ``limit`` nodes are kept. Returns the
    finding (the first round's per-node errors) and the model with the chosen nodes in FP32
    (None when none was)."""
    clock = time.perf_counter()
    big = sum(t.ByteSize() for t in fp32.graph.initializer) > LARGE_MODEL
    n = min(SENSITIVITY_SAMPLES // 4 if big else SENSITIVITY_SAMPLES, min(len(v) for v in calibration.values()))
    feeds = {k: v[:n] for k, v in calibration.items()}
    want = _ort_run(fp32, feeds, batch)
    result = Sensitivity(_relative_error(_ort_run(quantized.model, feeds, batch), want), samples=n)
    best_model, current = None, result.error
    candidates = [x.name for x in quantized.model.graph.node if x.op_type not in QDQ and x.name]
    while quantized.prepared is not None and current >= SMALL_ERROR and len(result.chosen) < limit:
        errors, models = {}, {}
        for node in candidates:
            if node in result.chosen:
                continue
            variant = _fp32_nodes(quantized.model, quantized.prepared, [*result.chosen, node])
            if variant is not None:
                errors[node] = _relative_error(_ort_run(variant, feeds, batch), want)
                models[node] = variant
        if not result.per_node:
            result.per_node = dict(errors)
            # later rounds try the first round's most promising nodes only
            candidates = sorted(errors, key=errors.get)[:LATER_ROUNDS]
        if not errors:
            break
        node = min(errors, key=errors.get)
        if current - errors[node] < DOMINANT * current:
            break
        result.chosen.append(node)
        result.rounds.append({"node": node, "error": errors[node]})
        current, best_model = errors[node], models[node]
    result.error_after = current if result.chosen else None
    result.seconds = time.perf_counter() - clock
    return result, best_model


def quantize_with_fallback(fp32: onnx.ModelProto, calibration: dict[str, np.ndarray], source: str,
                           batch: int | None = None, fallback: str | int | Sequence[str] = "auto"
                           ) -> tuple[Quantized, Sensitivity | None]:
    """:func:`quantize`, then (``fallback`` "auto", or at most that many nodes; 0: none) the nodes
    whose quantization dominates the error kept in FP32 (:func:`sensitivity`). ``fallback`` may
    also name the nodes to keep in FP32 (those of another run: no search; names not in this
    model are passed over)."""
    first = quantize(fp32, calibration, source, batch=batch)
    if fallback in (0, "0"):
        return first, None
    if not isinstance(fallback, (str, int)):
        names = [n for n in fallback if any(x.name == n for x in first.model.graph.node)]
        model = _fp32_nodes(first.model, first.prepared, names) if names and first.prepared is not None else None
        if model is None:
            return first, None
        restore_interface(model, fp32, source)
        return Quantized(model, first.settings, first.calibration_samples, names, first.seconds, first.prepared), None
    found, model = sensitivity(fp32, first, calibration, batch, MAX_FP32 if fallback == "auto" else int(fallback))
    first.seconds += found.seconds
    if model is None:
        return first, found
    restore_interface(model, fp32, source)
    return Quantized(model, first.settings, first.calibration_samples, list(found.chosen), first.seconds,
                     first.prepared), found


def _shape(value: onnx.ValueInfoProto) -> tuple:
    t = value.type.tensor_type
    if not t.HasField("shape"):
        return None, t.elem_type
    return tuple(d.dim_value if d.HasField("dim_value") else d.dim_param or "?" for d in t.shape.dim), t.elem_type


def restore_interface(quantized: onnx.ModelProto, original: onnx.ModelProto, source: str) -> None:
    """Give ``quantized`` the inputs, outputs (names, element types, shapes with their named
    dims), metadata and doc of ``original``; drop opset domains no node uses. Raises when the
    quantizer changed the inputs or outputs beyond their declared shapes (a bug to report)."""
    def inputs(m: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
        inits = {t.name for t in m.graph.initializer}
        return [v for v in m.graph.input if v.name not in inits]

    for kind, want, got in (("inputs", inputs(original), inputs(quantized)),
                            ("outputs", list(original.graph.output), list(quantized.graph.output))):
        if [(v.name, v.type.tensor_type.elem_type) for v in want] != [(v.name, v.type.tensor_type.elem_type) for v in got]:
            raise BnSlimError(f"{source}: INT8 quantization changed the model's {kind} "
                              f"({[v.name for v in want]} -> {[v.name for v in got]}); nothing was written. This is a "
                              "bug in onnx-bnslim: please report it with the model")
        for a, b in zip(want, got):
            if _shape(a) != _shape(b):
                b.type.CopyFrom(a.type)  # shape inference may have fixed a named dim: the original's own
    used = {n.domain or "" for n in quantized.graph.node}
    kept = [o for o in quantized.opset_import if (o.domain or "") in used or o.domain in ("", "ai.onnx")]
    del quantized.opset_import[:]
    quantized.opset_import.extend(kept)
    del quantized.metadata_props[:]
    quantized.metadata_props.extend(original.metadata_props)
    quantized.doc_string = original.doc_string
    quantized.producer_name, quantized.producer_version = original.producer_name, original.producer_version
    quantized.graph.name = original.graph.name


def quantize_files(models: dict[str, str | Path], data, folder: str | Path, input_shapes: dict | None = None,
                   preprocess: str | None = None, calibration_samples: int | None = None,
                   fallback: str | int | Sequence[str] = "auto") -> tuple[dict[str, Path], str, dict[str, list[str]]]:
    """Each FP32 model file of ``models`` (label -> path) quantized into ``folder`` (label.onnx),
    calibrated on the calibration share of ``data`` as ``prune --quantize`` takes it (the first
    half, or ``calibration_samples``); returns the paths, a description of the samples and the
    nodes each kept in FP32 (:func:`quantize_with_fallback`)."""

    if data is None:
        raise BnSlimError(NEEDS_DATA)
    out, described, kept = {}, "", {}
    for label, path in models.items():
        model = load_model(path)
        if is_quantized(model):
            raise BnSlimError(f"{path}: already quantized (QuantizeLinear / QLinear nodes); pass the FP32 model, "
                              "which bench quantizes itself")
        shapes, _ = resolve_input_shapes(model, input_shapes or {}, str(path))
        samples = data_module.load(data, model, shapes, preprocess)
        calibration, _, note = data_module.split(samples, calibration_samples)
        quantized, _ = quantize_with_fallback(model, calibration.arrays, str(path), static_batch(model), fallback)
        out[label], kept[label] = Path(folder) / f"{label}.onnx", quantized.excluded
        save_model(quantized.model, out[label])
        described = calibration.describe() + (f" ({note})" if note else "")
    return out, described, kept


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model already holds QDQ or QOperator INT8 nodes."""
    return any(n.op_type in INT8 or n.op_type.startswith(QOPERATOR_PREFIX) for n in model.graph.node)


def qoperator_ops(model: onnx.ModelProto) -> list[str]:
    """The QOperator INT8 ops of the model (QLinearConv, ConvInteger, QGemm, ...), sorted; empty
    for FP32 and QDQ models (which prune: their weights are DequantizeLinear of integers)."""
    return sorted({n.op_type for n in model.graph.node
                   if n.op_type in QOPERATOR or n.op_type.startswith(QOPERATOR_PREFIX)})


QDQ_HOWTO = ("onnx-bnslim prunes QDQ models (weights as DequantizeLinear of integers): quantize the FP32 model "
             "with onnxruntime.quantization.quantize_static(..., quant_format=QuantFormat.QDQ), or prune the "
             "FP32 model with --quantize int8")


def step_metrics(verification) -> dict:
    """The compact numbers of one comparison (verify.Verification) for the report's steps."""
    return {"top1_agreement": verification.top1_agreement, "cosine": verification.cosine,
            "max_rel_diff": verification.max_rel_diff, "max_abs_diff": verification.max_abs_diff,
            "samples": verification.samples}


__all__ = ["MODES", "NEEDS_DATA", "Settings", "Quantized", "settings_for_cpu", "quantize", "restore_interface",
           "calibration_batches",
           "is_quantized", "qoperator_ops", "QDQ_HOWTO", "quantize_files", "step_metrics",
           "Sensitivity", "sensitivity", "quantize_with_fallback"]

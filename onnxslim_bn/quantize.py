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
import platform
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx

from .errors import BnSlimError
from .hardware import _cpuinfo_flags
from .model_io import _save_external, too_large_for_protobuf

log = logging.getLogger(__name__)

MODES = ("int8",)  # --quantize values
CALIBRATION_BATCH = 16
NEEDS_DATA = ("--quantize int8 calibrates each activation's INT8 range on real inputs (random noise would set "
              "ranges the deployed model never sees): pass --data (an .npz, .npy or a folder of images)")


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


def settings_for_cpu(cpuinfo: str | None = None, machine: str | None = None) -> Settings:
    """The activation type that suits this CPU's INT8 instructions (see the module doc)."""
    machine = (machine if machine is not None else platform.machine()).lower()
    if cpuinfo is None:
        try:
            cpuinfo = Path("/proc/cpuinfo").read_text()
        except OSError:
            cpuinfo = ""
    flags = _cpuinfo_flags(cpuinfo)
    if machine.startswith(("arm", "aarch64")) or "asimd" in flags:
        return Settings(activations="int8", reason="ARM: SDOT multiplies signed by signed 8-bit values (S8S8)")
    vnni = bool({"avx512_vnni", "avx_vnni", "avx512vnni"} & flags)
    if vnni:
        return Settings(reason="x86 with VNNI: VPDPBUSD multiplies unsigned 8-bit activations by signed 8-bit "
                               "weights (U8S8) without saturation")
    return Settings(reduce_range=True,
                    reason="x86 without VNNI: VPMADDUBSW takes u8 activations x s8 weights (U8S8); its int16 "
                           "pair sums can saturate, so the weights use 7 bits (reduce_range)")


class _Reader:
    """onnxruntime's CalibrationDataReader protocol over arrays, batch by batch."""

    def __init__(self, arrays: dict[str, np.ndarray], batch: int | None):
        n = min(len(v) for v in arrays.values())
        step = batch or CALIBRATION_BATCH
        self.batches = []
        for i in range(0, n, step):
            part = {k: v[i : i + step] for k, v in arrays.items()}
            short = step - len(next(iter(part.values())))
            if batch and short:  # a fixed batch size: pad the last batch with copies of its last sample
                part = {k: np.concatenate([v, np.repeat(v[-1:], short, axis=0)]) for k, v in part.items()}
            self.batches.append(part)
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
    names = {n.name for n in model.graph.node}
    unknown = [n for n in exclude if n not in names]
    if unknown:
        raise BnSlimError(f"{source}: cannot keep node '{unknown[0]}' in FP32: the model has no node of that name")
    activation = QuantType.QUInt8 if settings.activations == "uint8" else QuantType.QInt8
    external = too_large_for_protobuf(model)
    with tempfile.TemporaryDirectory(prefix="onnx-bnslim-int8-") as tmp:
        fp32, pre, out = (Path(tmp) / f for f in ("fp32.onnx", "pre.onnx", "int8.onnx"))
        _save_external(model, fp32) if external else fp32.write_bytes(model.SerializeToString())
        try:
            quant_pre_process(str(fp32), str(pre), save_as_external_data=external)
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
                     time.perf_counter() - clock)


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
                   preprocess: str | None = None, calibration_samples: int | None = None) -> tuple[dict[str, Path], str]:
    """Each FP32 model file of ``models`` (label -> path) quantized into ``folder`` (label.onnx),
    calibrated on the calibration share of ``data`` as ``prune --quantize`` takes it (the first
    half, or ``calibration_samples``); returns the paths and a description of the samples."""
    from . import data as data_module
    from .model_io import load_model, save_model
    from .shapes import resolve_input_shapes

    if data is None:
        raise BnSlimError(NEEDS_DATA)
    out, described = {}, ""
    for label, path in models.items():
        model = load_model(path)
        if is_quantized(model):
            raise BnSlimError(f"{path}: already quantized (QuantizeLinear / QLinear nodes); pass the FP32 model, "
                              "which bench quantizes itself")
        shapes, _ = resolve_input_shapes(model, input_shapes or {}, str(path))
        samples = data_module.load(data, model, shapes, preprocess)
        calibration, _, note = data_module.split(samples, calibration_samples)
        quantized = quantize(model, calibration.arrays, str(path), batch=_static_batch(model))
        out[label] = Path(folder) / f"{label}.onnx"
        save_model(quantized.model, out[label])
        described = calibration.describe() + (f" ({note})" if note else "")
    return out, described


def _static_batch(model: onnx.ModelProto) -> int | None:
    inits = {t.name for t in model.graph.initializer}
    for value in model.graph.input:
        dims = value.type.tensor_type.shape.dim
        if value.name not in inits and dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            return dims[0].dim_value
    return None


def is_quantized(model: onnx.ModelProto) -> bool:
    """Whether the model already holds QDQ or QOperator INT8 nodes."""
    return any(n.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul", "ConvInteger",
                             "MatMulInteger") for n in model.graph.node)


def step_metrics(verification) -> dict:
    """The compact numbers of one comparison (verify.Verification) for the report's steps."""
    return {"top1_agreement": verification.top1_agreement, "cosine": verification.cosine,
            "max_rel_diff": verification.max_rel_diff, "max_abs_diff": verification.max_abs_diff,
            "samples": verification.samples}


__all__ = ["MODES", "NEEDS_DATA", "Settings", "Quantized", "settings_for_cpu", "quantize", "restore_interface",
           "is_quantized", "quantize_files", "step_metrics"]

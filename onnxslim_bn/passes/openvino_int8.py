"""The INT8 OpenVINO IR through NNCF: ``--quantize int8 --openvino DIR`` with ``nncf`` installed
(``pip install 'onnx-bnslim[nncf]'``).

What is done, and why
---------------------
- The pruned **FP32** model (not the onnxruntime QDQ model) is read by OpenVINO and quantized by
  NNCF's post-training quantization (``nncf.quantize``) in OpenVINO itself: NNCF places the
  FakeQuantize nodes where OpenVINO's CPU plugin fuses them into its INT8 kernels, and corrects
  each layer's bias for the quantization's shift (fast bias correction). Without nncf, the INT8
  IR is OpenVINO's reading of the onnxruntime QDQ model (the fallback; the report says which).
- Calibration on the **calibration share** of ``--data`` only, the same samples the onnxruntime
  INT8 model calibrates on; never the check's. One sample per calibration step when the batch is
  dynamic (NNCF's statistics assume it), else batches of the model's fixed size. Activation
  ranges are **MinMax** (min and max over all calibration samples), as in the onnxruntime route:
  NNCF's default for activations (the mean of per-sample extremes) clips the rarer large values;
  on the sparse fixtures it gave the same held-out accuracy with two to three times the largest
  error against the original, and the two INT8 models are checked alike only with alike ranges.
- Preset **performance** (symmetric activations and symmetric per-channel weights), target
  device CPU: after ReLU a symmetric activation range is unsigned with zero point 0, the u8 x s8
  form the CPU's INT8 dot products take (AVX-512 / AVX VNNI ``VPDPBUSD``, ``VPMADDUBSW``)
  with no zero-point correction per output; ``mixed`` (asymmetric activations) pays that
  correction for a finer range of activations that go negative, which CNNs of Conv-BN-ReLU
  blocks rarely have (measured on the fixtures: the same held-out accuracy within 0.2 points).
- NNCF's overflow fix (weights on half the 8-bit range, against the int16 saturation of
  ``VPMADDUBSW``): off with VNNI and on ARM (no saturation there), on the first layer only on
  x86 without VNNI (NNCF's advice for AVX2 / AVX-512), as onnxruntime's ``reduce_range`` is set.
- NNCF sends usage telemetry unless told not to; the tool never reaches the network, so it sets
  NNCF's own switch (``NNCF_CI``) before nncf is first imported. NNCF's log and progress bars
  (written to stdout) are silenced while it runs; its warnings go to this module's logger.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx

from ..errors import BnSlimError
from ..hardware import cpu_features
from ..ir import openvino_ir
from ..ir.openvino_ir import OpenVinoResult
from . import verify
from .quantize import calibration_batches, step_metrics

log = logging.getLogger(__name__)

INSTALL_HINT = "pip install 'onnx-bnslim[nncf]'"
ROUTES = ("auto", "nncf", "qdq")  # --openvino-int8: auto is nncf when installed, else qdq
FALLBACK_NOTE = ("nncf is not installed: the INT8 OpenVINO IR is OpenVINO's reading of the onnxruntime QDQ model "
                 f"(its QDQ pairs as FakeQuantize), checked against onnxruntime; {INSTALL_HINT} for NNCF's "
                 "quantization of the pruned FP32 model in OpenVINO")


def available() -> bool:
    """Whether NNCF can be imported (and OpenVINO, which it quantizes for)."""
    if not openvino_ir.available():
        return False
    os.environ.setdefault("NNCF_CI", "1")  # NNCF's switch for its telemetry stub: no network
    try:
        import nncf  # noqa: F401
    except ImportError:
        return False
    return True


def require(what: str = "--openvino-int8 nncf") -> None:
    """Fail in one line, before any work, when ``what`` needs NNCF and it is not installed."""
    if not available():
        raise BnSlimError(f"{what} needs NNCF, which is not installed: {INSTALL_HINT}")


@dataclass(frozen=True)
class NncfSettings:
    """How NNCF quantized (the report's ``openvino.quantizer``)."""

    preset: str = "performance"
    target_device: str = "CPU"
    overflow_fix: str = "disable"
    fast_bias_correction: bool = True
    calibration: str = "MinMax"  # activation ranges: NNCF's RangeEstimatorParametersSet.MINMAX
    reason: str = ""
    calibration_samples: int = 0
    calibration_batch: int = 1
    seconds: float = 0.0
    version: str = ""
    # nodes onnxruntime's INT8 step kept in FP32 (quantize.sensitivity), and those of them found in
    # OpenVINO's graph and kept in FP32 by NNCF too (its fusions rename the others)
    fp32_nodes: list = field(default_factory=list)
    fp32_nodes_found: list = field(default_factory=list)

    def to_dict(self) -> dict:
        return asdict(self)


def settings_for_cpu(cpuinfo: str | None = None, machine: str | None = None) -> NncfSettings:
    """The preset and overflow fix that suit this CPU's INT8 instructions (see the module doc)."""
    machine, flags = cpu_features(cpuinfo, machine)
    preset = ("performance: symmetric activations (unsigned with zero point 0 after ReLU) and symmetric per-channel "
              "weights, the u8 x s8 products of the CPU's INT8 kernels without a zero-point correction")
    if machine.startswith(("arm", "aarch64")) or "asimd" in flags:
        return NncfSettings(reason=f"{preset}; ARM: no 8-bit saturation, full weight range (overflow fix off)")
    if {"avx512_vnni", "avx_vnni", "avx512vnni"} & flags:
        return NncfSettings(reason=f"{preset}; x86 with VNNI: VPDPBUSD accumulates in int32 without saturation, "
                                   "full weight range (overflow fix off)")
    return NncfSettings(overflow_fix="first_layer_only",
                        reason=f"{preset}; x86 without VNNI: VPMADDUBSW's int16 pair sums can saturate, the first "
                               "layer's weights on half the range (NNCF's overflow fix for AVX2 / AVX-512)")


@contextlib.contextmanager
def _quiet(nncf_logger: logging.Logger):
    """NNCF's INFO log and progress bars (stdout) silenced; its warnings to this module's logger."""
    handlers, level, propagate = list(nncf_logger.handlers), nncf_logger.level, nncf_logger.propagate
    for h in handlers:
        nncf_logger.removeHandler(h)
    nncf_logger.setLevel(logging.WARNING)
    nncf_logger.propagate = False
    forward = logging.Handler(logging.WARNING)
    forward.emit = lambda record: log.warning("NNCF: %s", record.getMessage())
    nncf_logger.addHandler(forward)
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        nncf_logger.removeHandler(forward)
        for h in handlers:
            nncf_logger.addHandler(h)
        nncf_logger.setLevel(level)
        nncf_logger.propagate = propagate


def quantize_ir(model: onnx.ModelProto, calibration: dict[str, np.ndarray], source: str, batch: int | None = None,
                settings: NncfSettings | None = None, fp32_nodes: list[str] | tuple = ()):
    """``model`` (FP32) read by OpenVINO and quantized by ``nncf.quantize`` on ``calibration``
    (arrays per input, samples on axis 0); ``batch``: the model's fixed batch size, if any.
    Returns the INT8 ``ov.Model`` and the settings with the calibration's size and time."""
    require("the NNCF INT8 IR")
    import nncf
    from nncf.quantization.advanced_parameters import AdvancedQuantizationParameters, OverflowFix
    from nncf.quantization.range_estimator import RangeEstimatorParametersSet

    settings = settings or settings_for_cpu()
    items = calibration_batches(calibration, batch, step=1)
    if not items:
        raise BnSlimError(f"{source}: the NNCF INT8 IR needs calibration samples (--data)")
    clock = time.perf_counter()
    ov_model = openvino_ir.convert(model)
    found = _ov_names(ov_model, fp32_nodes)
    try:
        with _quiet(logging.getLogger("nncf")):
            quantized = nncf.quantize(
                ov_model, nncf.Dataset(items), preset=nncf.QuantizationPreset(settings.preset),
                target_device=nncf.TargetDevice[settings.target_device], subset_size=len(items),
                ignored_scope=nncf.IgnoredScope(names=[ov for _, ov in found]) if found else None,
                fast_bias_correction=settings.fast_bias_correction,
                advanced_parameters=AdvancedQuantizationParameters(
                    overflow_fix=OverflowFix(settings.overflow_fix),
                    activations_range_estimator_params=RangeEstimatorParametersSet.MINMAX))
    except Exception as exc:  # NNCF raises its own and plain exception types
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise BnSlimError(f"{source}: NNCF's INT8 quantization failed ({first}); pass --openvino-int8 qdq for "
                          "OpenVINO's reading of the onnxruntime INT8 model, or report the model") from exc
    samples = min(len(v) for v in calibration.values())
    done = NncfSettings(**{**asdict(settings), "calibration_samples": samples,
                           "calibration_batch": batch or 1, "seconds": time.perf_counter() - clock,
                           "version": nncf.__version__, "fp32_nodes": list(fp32_nodes),
                           "fp32_nodes_found": [onnx_name for onnx_name, _ in found]})
    return quantized, done


def _ov_names(ov_model, onnx_nodes: list[str] | tuple) -> list[tuple[str, str]]:
    """(ONNX node, OpenVINO op) for each of ``onnx_nodes`` OpenVINO's reader kept by name: a Conv
    or Gemm with a bias becomes ``<name>/WithoutBiases`` + an Add named ``<name>``, the weighted
    op being the one NNCF quantizes; a fused op loses its name and is not found."""
    names = {op.get_friendly_name() for op in ov_model.get_ops()}
    found = []
    for node in onnx_nodes:
        for candidate in (f"{node}/WithoutBiases", node):
            if candidate in names:
                found.append((node, candidate))
                break
    return found


def int8_tolerance(onnxruntime_int8_rel: float, fp16: bool) -> float:
    """How far NNCF's INT8 IR may be from the FP32 original (max |diff| over the largest |output|
    on the check samples): twice what the onnxruntime INT8 model of the same slim model is, at
    least 2% (the two quantizers round apart; their errors, not their outputs, are compared)."""
    return max(2 * onnxruntime_int8_rel, 2e-2, 3e-2 if fp16 else 0.0)


def export_int8_ir(fp32: onnx.ModelProto, out_dir: str | os.PathLike, name: str, fp16: bool,
                   calibration: dict[str, np.ndarray], feeds: dict[str, np.ndarray], reference: list[np.ndarray],
                   samples: int, described: str, tolerance: float, gates: dict, source: str,
                   batch: int | None = None, fp32_nodes: list[str] | tuple = ()) -> OpenVinoResult:
    """NNCF's INT8 IR of the pruned FP32 model ``fp32`` in ``out_dir`` (``name.xml`` + ``.bin``),
    checked against the FP32 original: ``reference`` is the original's outputs on the first
    ``samples`` samples of ``feeds`` (the check's inputs). Passes when the relative error is within
    ``tolerance`` and the run's gates (``gates``: max_error, min_cosine, max_rel_error) hold;
    files appear only then (:func:`onnxslim_bn.ir.openvino_ir.write_checked`)."""
    quantized, settings = quantize_ir(fp32, calibration, source, batch, fp32_nodes=fp32_nodes)
    names = [o.name for o in fp32.graph.output]

    def check(got: list[np.ndarray], xml: Path) -> OpenVinoResult:
        found = verify.compare(fp32, names, reference, [g[:samples] for g in got], samples, described,
                               f"{xml} (NNCF INT8)")
        failed = found.gate(gates.get("max_error"), gates.get("min_cosine"), gates.get("max_rel_error"))
        if not found.max_rel_diff <= tolerance:
            beyond = f"max relative diff {found.max_rel_diff:.3g} against the FP32 original exceeds {tolerance:.3g}"
            failed = f"{failed}; {beyond}" if failed else beyond
        if failed:
            raise BnSlimError(f"{xml}: NNCF's INT8 IR fails the check against the FP32 original: {failed}; nothing was "
                              "written. Pass --openvino-int8 qdq for OpenVINO's reading of the onnxruntime INT8 model")
        metrics = {**step_metrics(found), "tolerance": tolerance, "inputs": described}
        return OpenVinoResult(str(xml), fp16, found.max_abs_diff, max(o.max_abs_value for o in found.outputs), True,
                              route="nncf", compared_with="the FP32 original", check=metrics,
                              quantizer=settings.to_dict())

    return openvino_ir.write_checked(quantized, out_dir, name, fp16, feeds, check)


__all__ = ["INSTALL_HINT", "ROUTES", "FALLBACK_NOTE", "NncfSettings", "available", "require", "settings_for_cpu",
           "quantize_ir", "int8_tolerance", "export_int8_ir"]

"""Hand the pruned model to OpenVINO: IR export and an output check against onnxruntime."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import onnx

from ..errors import BnSlimError
from .model_io import as_file

# OpenVINO's CPU plugin computes in FP32 when asked to; FP16 weights cost about 3 decimal digits.
TOLERANCE = {False: 1e-4, True: 2e-2}  # of the largest |output|, by --fp16


@dataclass
class OpenVinoResult:
    xml: str
    fp16: bool
    max_abs_diff: float  # OpenVINO against ``compared_with`` on the check's inputs
    max_abs_value: float  # the largest |output| of ``compared_with``
    passed: bool
    # "onnx": OpenVINO read the ONNX model written (FP32, or the onnxruntime QDQ INT8 model, its
    # QDQ pairs read as FakeQuantize); "nncf": NNCF quantized the pruned FP32 model in OpenVINO
    route: str = "onnx"
    compared_with: str = "onnxruntime, the same model"
    # route "nncf": the check against the FP32 original (quantize.step_metrics, with its tolerance)
    check: dict | None = None
    quantizer: dict | None = None  # route "nncf": how NNCF quantized (passes.openvino_int8.NncfSettings)

    def to_dict(self) -> dict:
        return asdict(self)


INSTALL_HINT = "pip install 'onnx-bnslim[openvino]'"


@contextlib.contextmanager
def no_telemetry() -> Iterator[None]:
    """Keep OpenVINO from sending usage telemetry: ovc starts it when ``openvino`` is first
    imported and again in ``convert_model``, on by default when no consent file exists, and
    declines only in CI (``CI=true``), so both run as if in CI. The tool makes no network calls
    at run time; the user's consent file is not touched."""
    before = os.environ.get("CI")
    os.environ["CI"] = "true"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop("CI", None)
        else:
            os.environ["CI"] = before


def available() -> bool:
    """Whether OpenVINO can be imported (it is an optional extra: ``onnx-bnslim[openvino]``)."""
    try:
        with no_telemetry():
            import openvino  # noqa: F401
    except ImportError:
        return False
    return True


def require(what: str = "--openvino") -> None:
    """Fail in one line, before any work, when ``what`` needs OpenVINO and it is not installed."""
    if not available():
        raise BnSlimError(f"{what} needs OpenVINO, which is not installed: {INSTALL_HINT}")


def _openvino():
    require("the OpenVINO hand-off")
    with no_telemetry():
        import openvino

    return openvino


def compile_cpu(model, threads: int | None = None, fp32: bool = True):
    """A compiled OpenVINO CPU model from an ov.Model or a file path."""
    ov = _openvino()
    config = {"INFERENCE_PRECISION_HINT": "f32"} if fp32 else {}
    if threads:
        config["INFERENCE_NUM_THREADS"] = int(threads)
    return ov.Core().compile_model(model, "CPU", config)


def convert(model: onnx.ModelProto):
    """``model`` as an ``ov.Model`` (OpenVINO's ONNX reader), without telemetry."""
    ov = _openvino()
    with as_file(model) as onnx_path, no_telemetry():
        return ov.convert_model(str(onnx_path))


def infer(compiled, feeds: dict[str, np.ndarray]) -> list[np.ndarray]:
    """A compiled model's outputs on ``feeds`` (samples on axis 0), in steps of its static batch."""
    request = compiled.create_infer_request()
    outputs = []
    n = len(next(iter(feeds.values())))
    batch = compiled.inputs[0].get_partial_shape()[0]
    step = batch.get_length() if batch.is_static else n
    for i in range(0, n, step):
        result = request.infer({k: v[i : i + step] for k, v in feeds.items()})
        outputs.append([result[o] for o in compiled.outputs])
    return [np.concatenate(parts) for parts in zip(*outputs)]


def write_checked(ov_model, out_dir: str | os.PathLike, name: str, fp16: bool, feeds: dict[str, np.ndarray],
                  check: Callable[[list[np.ndarray], Path], OpenVinoResult]) -> OpenVinoResult:
    """Save ``ov_model`` as ``name.xml`` + ``name.bin``, run the saved IR on ``feeds`` (CPU, FP32
    precision: see :func:`compile_cpu`) and hand its outputs and the final ``.xml`` path to
    ``check``, which raises :class:`BnSlimError` when they fail. Files appear in ``out_dir`` only
    after the check passed, each by an atomic rename."""
    ov = _openvino()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix=".ir-") as tmp:
        xml = Path(tmp) / f"{name}.xml"
        ov.save_model(ov_model, str(xml), compress_to_fp16=fp16)
        result = check(infer(compile_cpu(str(xml)), feeds), out_dir / f"{name}.xml")
        for suffix in (".bin", ".xml"):  # .xml last: a reader never sees an .xml without its .bin
            shutil.move(str(xml.with_suffix(suffix)), str(out_dir / f"{name}{suffix}"))
    return result


def export_ir(model: onnx.ModelProto, out_dir: str | os.PathLike, name: str, fp16: bool,
              feeds: dict[str, np.ndarray], reference: list[np.ndarray],
              tolerance: float | None = None) -> OpenVinoResult:
    """Convert ``model`` to IR in ``out_dir`` (``name.xml`` + ``name.bin``) and compare
    OpenVINO's outputs with ``reference`` (onnxruntime's, on ``feeds``), within ``tolerance`` of
    the largest |output| (default :data:`TOLERANCE`; an INT8 model rounds differently in each).

    Files appear in ``out_dir`` only after the check passed, each by an atomic rename.
    """
    def check(got: list[np.ndarray], xml: Path) -> OpenVinoResult:
        diff = max(float(np.max(np.abs(a.astype(np.float64) - b.astype(np.float64)))) for a, b in zip(got, reference))
        scale = max(float(np.max(np.abs(r))) for r in reference)
        if not diff <= (TOLERANCE[fp16] if tolerance is None else tolerance) * max(scale, 1.0):
            raise BnSlimError(f"{xml}: OpenVINO's outputs differ from onnxruntime's by {diff:.3g} "
                              f"(outputs up to {scale:.3g}); nothing was written. Try without --fp16 or report the model")
        return OpenVinoResult(str(xml), fp16, diff, scale, True)

    return write_checked(convert(model), out_dir, name, fp16, feeds, check)

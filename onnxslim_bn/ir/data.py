"""Calibration and check inputs in the forms people hold them.

``--data`` (``PruneOptions.data``) accepts:

- an ``.npz`` with one array per model input, named after it (``numpy.savez(path, input=x)``),
  samples along axis 0; other arrays (labels) are ignored;
- an ``.npy`` holding the samples of a model with one input;
- a folder of images (``.png .jpg .jpeg .bmp .ppm .pgm .tif .tiff .webp .gif``), read with
  Pillow (the ``images`` extra: ``pip install 'onnx-bnslim[images]'``) and preprocessed by
  ``--preprocess`` (below), for a model with one image input;
- a folder of ``.npy`` files, one sample each (with or without a batch axis of 1), for a model
  with one input: the route without Pillow (preprocess the images yourself);
- in the Python API, arrays in memory: ``prune(model, data={"input": array})`` (or a bare array
  for a model with one input).

Folders are read in file-name order. Arrays are cast to the dtype of the model input.

**Preprocessing images** (``--preprocess KEY=VALUE ...``, the habits of OpenVINO's and
onnxruntime's calibration readers). Each image becomes ``(pixel * scale - mean) / std`` with
pixels in 0..255:

- ``size=H,W`` (or ``size=S`` for a square): resize to this; default the model input's H and W;
- ``resize=S``: first resize the shorter side to S (aspect kept), then centre-crop to ``size``
  (the ``resize 256 / crop 224`` of ImageNet); without it the image is resized to ``size`` directly;
- ``scale=F`` (``1/255`` allowed, the default), ``mean=M`` and ``std=S`` (one value, or one per
  channel in the order the model receives them, after ``order``; defaults 0 and 1);
- ``order=RGB|BGR`` (default RGB); a model input with 1 channel gets grayscale;
- ``layout=NCHW|NHWC``: default from the input's shape (channel axis 1 when it has 1 or 3
  entries, else the last axis).

ImageNet-style models: ``--preprocess mean=0.485,0.456,0.406 std=0.229,0.224,0.225``; a Caffe/OpenVINO
habit (BGR, means in pixel units): ``--preprocess scale=1 order=BGR mean=103.94,116.78,123.68``.

**Calibration and check samples are disjoint** (:func:`split`): the first half of the samples
calibrates (or the first ``--calibration-samples N``), the rest checks. Data with fewer than
``MIN_SPLIT`` (64, twice the check's 32) samples is not split: all of it serves both, and a note
says so.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import numpy as np
import onnx

from ..errors import BnSlimError
from .shapes import graph_inputs

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp", ".gif")
CHECK_SAMPLES = 32  # the check's sample count without data, and the least it should have with it
MIN_SPLIT = 2 * CHECK_SAMPLES  # data smaller than this serves calibration and check both
PREPROCESS_EXAMPLE = "--preprocess size=224 mean=0.485,0.456,0.406 std=0.229,0.224,0.225"

@dataclass
class Samples:
    """Input arrays for the model (samples along axis 0), and where they came from."""

    arrays: dict[str, np.ndarray]
    source: str  # for messages: "heldout.npz", "images/ (40 images)", "in-memory arrays"
    start: int = 0  # first sample's index in the source, when this is a part of it
    total: int = 0  # samples in the whole source
    kind: str = "arrays"  # "npz", "npy", "images", "npy-folder", "arrays"
    batch: int | None = None  # the largest fixed batch size of the model's inputs: a part holds at least that

    @property
    def count(self) -> int:
        """Samples along axis 0 (a 0-d array, a rank-0 input's one value, is fed whole to every run)."""
        return min((len(v) for v in self.arrays.values() if np.ndim(v)), default=1 if self.arrays else 0)

    def part(self, start: int, stop: int) -> Samples:
        return Samples({k: v[start:stop] if np.ndim(v) else v for k, v in self.arrays.items()}, self.source,
                       self.start + start, self.total or self.count, self.kind, self.batch)

    def describe(self) -> str:
        """``"500 samples of heldout.npz [500:1000]"``; the range only for a part."""
        whole = not self.total or self.count == self.total
        span = "" if whole else f" [{self.start}:{self.start + self.count}]"
        return f"{self.count} sample{'' if self.count == 1 else 's'} of {self.source}{span}"


@dataclass(frozen=True)
class Preprocess:
    """How an image becomes an input tensor: ``(pixel * scale - mean) / std`` (see the module doc)."""

    size: tuple[int, int] | None = None  # (height, width); default the model input's
    resize: int | None = None  # shorter side first resized to this, then centre-cropped to size
    scale: float = 1 / 255
    mean: tuple[float, ...] = (0.0,)
    std: tuple[float, ...] = (1.0,)
    order: str = "RGB"
    layout: str | None = None  # "NCHW" / "NHWC"; default from the input's shape


def _floats(key: str, value: str) -> tuple[float, ...]:
    try:
        return tuple(float(Fraction(v)) for v in value.split(","))
    except (ValueError, ZeroDivisionError) as exc:
        raise BnSlimError(f"--preprocess {key}={value}: expected numbers separated by commas, "
                          f"e.g. {PREPROCESS_EXAMPLE}") from exc


def parse_preprocess(spec: str | None) -> Preprocess:
    """``"size=224 mean=0.485,0.456,0.406 std=0.229,0.224,0.225"`` -> :class:`Preprocess`."""
    fields: dict = {}
    for token in (spec or "").replace(";", " ").split():
        key, eq, value = token.partition("=")
        key = key.strip().lower()
        if not eq or not value:
            raise BnSlimError(f"--preprocess '{token}': expected KEY=VALUE, e.g. {PREPROCESS_EXAMPLE}")
        if key == "size":
            dims = _floats(key, value.replace("x", ","))
            if len(dims) not in (1, 2) or min(dims) < 1 or any(d != int(d) for d in dims):
                raise BnSlimError(f"--preprocess size={value}: expected HEIGHT,WIDTH or one size, e.g. size=224")
            fields["size"] = (int(dims[0]), int(dims[-1]))
        elif key == "resize":
            (side,) = _floats(key, value)[:1]
            if side < 1 or side != int(side):
                raise BnSlimError(f"--preprocess resize={value}: expected the shorter side in pixels, e.g. resize=256")
            fields["resize"] = int(side)
        elif key == "scale":
            fields["scale"] = _floats(key, value)[0]
        elif key in ("mean", "std"):
            fields[key] = _floats(key, value)
            if key == "std" and any(v == 0 for v in fields[key]):
                raise BnSlimError(f"--preprocess std={value}: a standard deviation of 0 divides by zero")
        elif key == "order":
            if value.upper() not in ("RGB", "BGR"):
                raise BnSlimError(f"--preprocess order={value}: expected RGB or BGR")
            fields["order"] = value.upper()
        elif key == "layout":
            if value.upper() not in ("NCHW", "NHWC"):
                raise BnSlimError(f"--preprocess layout={value}: expected NCHW or NHWC")
            fields["layout"] = value.upper()
        else:
            raise BnSlimError(f"--preprocess: unknown key '{key}'; keys are size, resize, scale, mean, std, order, "
                              f"layout (e.g. {PREPROCESS_EXAMPLE})")
    return Preprocess(**fields)


def load(data, model: onnx.ModelProto, input_shapes: dict[str, list[int]], preprocess: str | None = None) -> Samples:
    """The samples of ``data`` (any form of the module doc), checked against the model's inputs:
    every input present, one sample count, ranks and fixed dims as the model declares them."""
    inputs = graph_inputs(model)
    if isinstance(data, np.ndarray):
        data = _single(inputs, data, "the array passed as data")
    if isinstance(data, dict):
        samples = Samples({k: np.asarray(v) for k, v in data.items()}, "in-memory arrays")
    elif isinstance(data, (str, os.PathLike)):
        samples = _read(Path(data), inputs, input_shapes, preprocess)
    else:
        raise BnSlimError(f"data: expected a path (.npz, .npy, a folder of images) or a dict of arrays, "
                          f"not {type(data).__name__}")
    if preprocess and samples.kind != "images":
        raise BnSlimError(f"--preprocess applies to a folder of images; {samples.source} is not one: drop --preprocess")
    return _conform(samples, inputs)


def split(samples: Samples, calibration_samples: int | None = None) -> tuple[Samples, Samples, str | None]:
    """(calibration, check, note): the first ``calibration_samples`` (default: half) calibrate,
    the rest check. Fewer than ``MIN_SPLIT`` samples (and no explicit count): all serve both,
    and the note says so."""
    n = samples.count
    if calibration_samples is not None:
        if not 1 <= calibration_samples < n:
            raise BnSlimError(f"--calibration-samples {calibration_samples}: {samples.source} has {n} samples; "
                              f"pass a count from 1 to {n - 1} so that some are left for the check")
        cut = calibration_samples
        b = samples.batch or 1
        if min(cut, n - cut) < b:
            raise BnSlimError(f"--calibration-samples {calibration_samples}: the model's batch size is fixed at {b}, "
                              f"so the calibration and the check need {b} samples each; {samples.source} has {n}: "
                              + (f"pass a count from {b} to {n - b}" if n >= 2 * b else "drop --calibration-samples"))
    elif n >= MIN_SPLIT and n // 2 >= (samples.batch or 1):
        cut = n // 2
    else:
        return samples, samples, (
            f"{samples.source} has {n} samples, fewer than the {MIN_SPLIT} needed to keep {CHECK_SAMPLES} check "
            f"samples apart from the calibration: all {n} serve both, so the check is not independent of the calibration")
    return samples.part(0, cut), samples.part(cut, n), None


def _single(inputs: list[onnx.ValueInfoProto], array: np.ndarray, what: str) -> dict[str, np.ndarray]:
    if len(inputs) != 1:
        raise BnSlimError(f"{what}: one array feeds a model with one input; this model has inputs "
                          f"{[i.name for i in inputs]}: pass a dict / an .npz with an array per input")
    return {inputs[0].name: array}


def _read(path: Path, inputs: list[onnx.ValueInfoProto], input_shapes: dict[str, list[int]],
          preprocess: str | None) -> Samples:
    if path.is_dir():
        files = sorted(p for p in path.iterdir() if p.is_file())
        images = [p for p in files if p.suffix.lower() in IMAGE_SUFFIXES]
        arrays = [p for p in files if p.suffix.lower() == ".npy"]
        if images and arrays:
            raise BnSlimError(f"{path}: holds both images and .npy files; keep one kind of sample per folder")
        if images:
            return _images(path, images, inputs, input_shapes, parse_preprocess(preprocess))
        if arrays:
            return _npy_folder(path, arrays, inputs)
        raise BnSlimError(f"{path}: no images ({', '.join(IMAGE_SUFFIXES)}) and no .npy files in this folder")
    if not path.is_file():
        raise BnSlimError(f"{path}: no such file or folder for --data")
    if path.suffix.lower() == ".npy":
        return Samples(_single(inputs, _np_load(path), str(path)), path.name, kind="npy")
    try:
        archive = np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BnSlimError(f"{path}: cannot read it as .npz ({str(exc).splitlines()[0]}); save inputs with "
                          "numpy.savez(path, input_name=array), or pass a folder of images") from exc
    if not isinstance(archive, np.lib.npyio.NpzFile):
        return Samples(_single(inputs, archive, str(path)), path.name, kind="npy")
    with archive:
        missing = [i.name for i in inputs if i.name not in archive.files]
        if missing:
            raise BnSlimError(f"{path}: has no array '{missing[0]}' (it has {archive.files}); name the arrays after "
                              f"the model inputs {[i.name for i in inputs]}")
        return Samples({i.name: archive[i.name] for i in inputs}, path.name, kind="npz")


def _np_load(path: Path) -> np.ndarray:
    try:
        return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise BnSlimError(f"{path}: cannot read it as .npy ({str(exc).splitlines()[0]})") from exc


def _npy_folder(folder: Path, files: list[Path], inputs: list[onnx.ValueInfoProto]) -> Samples:
    _single(inputs, np.zeros(0), str(folder))
    (value,) = inputs
    rank = len(value.type.tensor_type.shape.dim)
    parts = []
    for f in files:
        a = _np_load(f)
        if a.ndim == rank - 1:
            a = a[None]
        if a.ndim != rank:
            raise BnSlimError(f"{f}: a sample of rank {a.ndim}; input '{value.name}' has rank {rank} "
                              f"(save one sample per file, with or without the batch axis)")
        if parts and a.shape[1:] != parts[0].shape[1:]:
            raise BnSlimError(f"{f}: shape {list(a.shape)} differs from {files[0].name}'s {list(parts[0].shape)}")
        parts.append(a)
    return Samples({value.name: np.concatenate(parts)}, f"{folder.name}/ ({len(files)} .npy files)", kind="npy-folder")


def _images(folder: Path, files: list[Path], inputs: list[onnx.ValueInfoProto], input_shapes: dict[str, list[int]],
            pre: Preprocess) -> Samples:
    try:
        from PIL import Image, UnidentifiedImageError
    except ImportError as exc:
        raise BnSlimError(f"{folder}: reading images needs Pillow: pip install 'onnx-bnslim[images]' "
                          "(or pass an .npz, or a folder of preprocessed .npy samples)") from exc
    _single(inputs, np.zeros(0), str(folder))
    (value,) = inputs
    dims = list(input_shapes.get(value.name) or [d.dim_value for d in value.type.tensor_type.shape.dim])
    if len(dims) != 4:
        raise BnSlimError(f"{folder}: images feed a 4-D input (NCHW or NHWC); input '{value.name}' has shape {dims}")
    layout = pre.layout or ("NCHW" if dims[1] in (1, 3) else "NHWC" if dims[3] in (1, 3) else None)
    if layout is None:
        raise BnSlimError(f"{folder}: cannot tell the channel axis of input '{value.name}' {dims}: "
                          "pass --preprocess layout=NCHW (or NHWC)")
    channels = dims[1] if layout == "NCHW" else dims[3]
    if channels not in (1, 3):
        raise BnSlimError(f"{folder}: input '{value.name}' {dims} ({layout}) takes {channels} channels; "
                          "images give 1 or 3")
    height, width = pre.size or ((dims[2], dims[3]) if layout == "NCHW" else (dims[1], dims[2]))
    mean, std = (np.asarray(v, np.float32) for v in (pre.mean, pre.std))
    for key, v in (("mean", mean), ("std", std)):
        if v.size not in (1, channels):
            raise BnSlimError(f"--preprocess {key}: {v.size} values for {channels} channels; give 1 or {channels}")
    out = np.empty((len(files), height, width, channels), np.float32)
    for i, f in enumerate(files):
        try:
            with Image.open(f) as img:
                pixels = _pixels(img, f, channels, pre, height, width, Image)
        except (OSError, UnidentifiedImageError) as exc:
            raise BnSlimError(f"{f}: cannot read it as an image ({str(exc).splitlines()[0]})") from exc
        pixels = pixels.reshape(height, width, -1)
        out[i] = pixels[..., ::-1] if pre.order == "BGR" else pixels
    out = (out * np.float32(pre.scale) - mean) / std
    if layout == "NCHW":
        out = out.transpose(0, 3, 1, 2)
    log.info("read %d images from %s as %s %s", len(files), folder, layout, list(out.shape))
    return Samples({value.name: np.ascontiguousarray(out)}, f"{folder.name}/ ({len(files)} images)", kind="images")


# Pillow modes of one channel deeper than 8 bits: the bits of their range
_DEEP = {"I;16": 16, "I;16B": 16, "I;16L": 16, "I;16N": 16}


def _pixels(img, f: Path, channels: int, pre: Preprocess, height: int, width: int, Image) -> np.ndarray:
    """One image as float32 pixels [H, W, C] in 0..255 units, resized (and cropped) as ``pre`` says.

    8-bit images go through Pillow's RGB / L conversion. 16-bit images (grayscale PNG, TIFF) are
    scaled by their bit depth, ``value * 255 / 65535``, so that ``--preprocess`` means the same for
    every bit depth; Pillow's own conversion to 8 bits would clip them at 255. Images of float or
    32-bit integer pixels are refused: no bit depth says what their range is."""
    bits = _DEEP.get(img.mode) or (16 if img.mode == "I" and img.format == "PNG" else None)
    if bits is None and img.mode in ("F", "I"):
        kind = "float" if img.mode == "F" else "32-bit integer"
        raise BnSlimError(f"{f}: {kind} pixels (Pillow mode {img.mode}) have no bit depth that says their range, so "
                          "--preprocess cannot scale them; save the preprocessed samples as .npy files (one per "
                          "sample) in a folder and pass that folder with --data")
    if bits is None:
        img = img.convert("L" if channels == 1 else "RGB")
        img = _resize(img, pre, height, width, Image)
        return np.asarray(img, np.float32)
    values = np.asarray(img, np.float64) * (255.0 / (2**bits - 1))
    plane = _resize(Image.fromarray(values.astype(np.float32), "F"), pre, height, width, Image)
    gray = np.asarray(plane, np.float32)[..., None]
    return gray if channels == 1 else np.repeat(gray, 3, axis=2)


def _resize(img, pre: Preprocess, height: int, width: int, Image):
    if pre.resize:
        ratio = pre.resize / min(img.size)
        img = img.resize((max(width, round(img.size[0] * ratio)), max(height, round(img.size[1] * ratio))),
                         Image.Resampling.BILINEAR)
        left, top = (img.size[0] - width) // 2, (img.size[1] - height) // 2
        return img.crop((left, top, left + width, top + height))
    return img.resize((width, height), Image.Resampling.BILINEAR)


def _conform(samples: Samples, inputs: list[onnx.ValueInfoProto]) -> Samples:
    """Every model input present, cast to its dtype; one sample count; ranks and fixed non-batch dims
    match; values finite and in the range of an integer input's dtype; at least as many samples as
    a fixed batch dimension takes. A rank-0 input takes one value (a 0-d array), fed to every run."""
    arrays, where = {}, samples.source
    batches: dict[str, int] = {}
    for value in inputs:
        if value.name not in samples.arrays:
            raise BnSlimError(f"{where}: no array for input '{value.name}' (it has {sorted(samples.arrays)}); "
                              "name the arrays after the model inputs")
        a = np.asarray(samples.arrays[value.name])
        dims = value.type.tensor_type.shape.dim
        if not dims and a.ndim:
            raise BnSlimError(f"{where}: array '{value.name}' has shape {list(a.shape)}, the model input is a scalar "
                              "(rank 0): give one value (a 0-d array, e.g. numpy.float32(0.5)), fed to every run")
        if a.ndim != len(dims):
            raise BnSlimError(f"{where}: array '{value.name}' has shape {list(a.shape)}, the model input has rank "
                              f"{len(dims)}; give samples along axis 0 with the input's other dims")
        for axis, dim in enumerate(dims):
            if axis and dim.HasField("dim_value") and dim.dim_value > 0 and a.shape[axis] != dim.dim_value:
                want = [d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in dims]
                raise BnSlimError(f"{where}: array '{value.name}' has shape {list(a.shape)}, the model input takes "
                                  f"{want} (axis {axis} differs)")
        if dims and dims[0].HasField("dim_value") and dims[0].dim_value > 0:
            batches[value.name] = dims[0].dim_value
        elem = value.type.tensor_type.elem_type
        dtype = np.dtype(onnx.helper.tensor_dtype_to_np_dtype(elem)) if elem else a.dtype
        arrays[value.name] = _cast(a, dtype, value.name, samples)
    counts = {k: len(v) for k, v in arrays.items() if v.ndim}
    if len(set(counts.values())) > 1:
        raise BnSlimError(f"{where}: the inputs hold different sample counts {counts}; give each the same number")
    if counts and not min(counts.values()):
        raise BnSlimError(f"{where}: holds no samples")
    n = min(counts.values(), default=0)
    short = {k: b for k, b in batches.items() if n < b}
    if short:
        name, b = next(iter(short.items()))
        raise BnSlimError(f"{where}: {n} sample{'' if n == 1 else 's'}, but input '{name}' fixes its batch size at {b}: "
                          f"give at least {b} samples (runs take whole batches)")
    return Samples(arrays, samples.source, samples.start, samples.total, samples.kind,
                   max(batches.values(), default=None))


def _cast(a: np.ndarray, dtype: np.dtype, name: str, samples: Samples) -> np.ndarray:
    """``a`` as ``dtype``, refused with the first sample at fault when it holds NaN / Inf, or values
    an integer or boolean input cannot hold as given (fractions, out of the dtype's range)."""
    where = samples.source
    if a.dtype.kind not in "biufc" or dtype.kind not in "biuf":
        return a if a.dtype == dtype else a.astype(dtype)
    if a.dtype.kind in "fc":
        _finite(a, name, samples, "")
    if dtype.kind in "iub" and a.dtype.kind in "fc":
        frac = a != np.round(a)
        if frac.any():
            i = _first_sample(frac)
            raise BnSlimError(f"{where}: array '{name}' holds fractions ({_value(a, frac)}{_at(i, samples)}) for an "
                              f"{dtype.name} input; integer inputs are read as given: pass whole numbers")
    if dtype.kind in "iu" and a.size:
        info = np.iinfo(dtype)
        out = (a < info.min) | (a > info.max)
        if out.any():
            i = _first_sample(out)
            raise BnSlimError(f"{where}: array '{name}' holds {_value(a, out)}{_at(i, samples)}, outside the range of "
                              f"the model's {dtype.name} input ({info.min}..{info.max}); pass values it can hold")
    if dtype.kind == "b" and a.dtype.kind != "b" and not np.isin(a, (0, 1)).all():
        i = _first_sample(~np.isin(a, (0, 1)))
        raise BnSlimError(f"{where}: array '{name}' holds values other than 0 and 1{_at(i, samples)} for a bool "
                          "input; pass 0/1 or booleans")
    with np.errstate(over="ignore", invalid="ignore"):  # an overflow becomes Inf, refused next
        cast = a if a.dtype == dtype else a.astype(dtype)
    if dtype.kind == "f" and cast is not a:
        _finite(cast, name, samples, f" once cast to the input's {dtype.name}")
    return cast


def _finite(a: np.ndarray, name: str, samples: Samples, after: str, step: int = 64) -> None:
    """Refuse NaN / Inf, naming the first sample holding one (checked ``step`` samples at a time:
    no mask as large as the data)."""
    parts = [(0, a)] if not a.ndim else ((i, a[i:i + step]) for i in range(0, len(a), step))
    first, kind, total = None, None, 0
    for start, part in parts:
        bad = ~np.isfinite(part)
        if not bad.any():
            continue
        total += int(bad.sum())
        if first is None:
            i = _first_sample(bad)
            first = None if i is None else start + i
            row = part[i] if i is not None else part
            kind = "NaN" if np.isnan(row).any() else "Inf"
    if total:
        raise BnSlimError(f"{samples.source}: array '{name}' holds {kind}{after}{_at(first, samples)} "
                          f"({total} non-finite values in all); calibration and the check need finite "
                          "inputs: fix or drop those samples")


def _first_sample(mask: np.ndarray) -> int | None:
    """Index along axis 0 of the first sample holding a flagged value (None for a 0-d array)."""
    return int(np.flatnonzero(mask.reshape(len(mask), -1).any(1))[0]) if mask.ndim else None


def _value(a: np.ndarray, mask: np.ndarray) -> str:
    return f"{a[mask].flat[0]:g}" if a.dtype.kind in "f" else str(a[mask].flat[0])


def _at(i: int | None, samples: Samples) -> str:
    return "" if i is None else f" in sample {samples.start + i}"


def describe_option(data) -> str | None:
    """``PruneOptions.data`` as text for reports and metadata: a path as given, arrays by shape."""
    if data is None or isinstance(data, (str, os.PathLike)):
        return None if data is None else os.fspath(data)
    if isinstance(data, np.ndarray):
        return f"in-memory array {list(data.shape)}"
    if isinstance(data, dict):
        return "in-memory arrays " + ", ".join(f"{k}: {list(np.shape(v))}" for k, v in data.items())
    return type(data).__name__

"""Loading and saving models: clear errors for bad files, atomic writes, external data."""

from __future__ import annotations

import contextlib
import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import BnSlimError

# A protobuf cannot exceed 2 GiB; models whose weights come near it travel as external data.
PROTO_LIMIT = 2**31 - 2**27


def too_large_for_protobuf(model: onnx.ModelProto) -> bool:
    from .metrics import weight_bytes

    return weight_bytes(model) > PROTO_LIMIT


def _save_external(model: onnx.ModelProto, path: Path) -> None:
    """Save with the weights in ``<name>.data`` beside ``path``, leaving ``model`` as it was
    (onnx.save_model moves the weights out of the proto in memory; they are read back)."""
    onnx.save_model(model, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                    location=path.name + ".data", size_threshold=1024)
    onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))


@contextlib.contextmanager
def as_file(model: onnx.ModelProto):
    """A temporary path holding ``model`` (weights as external data), for tools that need one."""
    with tempfile.TemporaryDirectory(prefix="onnx-bnslim-") as tmp:
        path = Path(tmp) / "model.onnx"
        _save_external(model, path)
        yield path


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with its external data) or raise one clear BnSlimError."""
    path = Path(path)
    if not path.is_file():
        raise BnSlimError(f"{path}: no such file; pass the path of an .onnx model")
    if path.stat().st_size == 0:
        raise BnSlimError(f"{path}: the file is empty; re-export the model")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError) as exc:
        raise BnSlimError(f"{path}: not a readable ONNX model ({_first_line(exc)}); "
                          "check that the file is complete and is an .onnx export") from exc
    if not model.graph.node:
        raise BnSlimError(f"{path}: not an ONNX model (no graph nodes); "
                          "check that the file is complete and is an .onnx export")
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError) as exc:
        raise BnSlimError(f"{path}: its external weight data cannot be read ({_first_line(exc)}); "
                          "keep the .data file beside the model") from exc
    return model


@contextlib.contextmanager
def _staged(path: Path):
    """A path to write ``path``'s content to; it replaces ``path`` in one rename on success."""
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise BnSlimError(f"{path}: the output folder {directory} does not exist; create it or pass another path")
    if not os.access(directory, os.W_OK):
        raise BnSlimError(f"{path}: the output folder {directory} is not writable; pass another path")
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.", dir=directory) as tmp:
        staged = Path(tmp) / path.name
        yield staged
        os.replace(staged, path)


def write_text(path: str | os.PathLike, text: str) -> None:
    """Write a text file (a JSON report) atomically."""
    with _staged(Path(path)) as staged:
        staged.write_text(text)


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write ``model`` to ``path`` atomically (staged, then renamed); return its size in bytes.

    Models too large for one protobuf are written with their weights in ``<name>.data``; the
    data file is moved in first, so the model never names a data file that is not there.
    """
    path = Path(path)
    external = too_large_for_protobuf(model)
    data = path.with_name(path.name + ".data")
    with _staged(path) as staged:
        if external:
            _save_external(model, staged)
            os.replace(staged.with_name(data.name), data)
        else:
            staged.write_bytes(model.SerializeToString())
    return path.stat().st_size + (data.stat().st_size if external else 0)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

"""Loading and saving models: clear errors for bad files, atomic writes, external data."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

import onnx
from google.protobuf.message import DecodeError

from .errors import BnSlimError

# A protobuf cannot exceed 2 GiB; above this we write the weights as external data.
_PROTO_LIMIT = 2**31 - 2**20


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


def save_model(model: onnx.ModelProto, path: str | os.PathLike) -> int:
    """Write ``model`` to ``path`` atomically (temp file + rename); return its size in bytes.

    Models too large for one protobuf are written with their weights in ``<name>.data``.
    """
    path = Path(path)
    directory = path.parent if str(path.parent) else Path(".")
    if not directory.is_dir():
        raise BnSlimError(f"{path}: the output folder {directory} does not exist; create it or pass another -o")
    if not os.access(directory, os.W_OK):
        raise BnSlimError(f"{path}: the output folder {directory} is not writable; pass another -o")
    from .metrics import weight_bytes

    external = weight_bytes(model) > _PROTO_LIMIT - 2**26  # ByteSize() would serialize the whole model
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=directory)
    os.close(fd)
    data_name = path.name + ".data"
    try:
        if external:
            tmp_data = Path(tmp).name + ".data"
            onnx.save_model(model, tmp, save_as_external_data=True, all_tensors_to_one_file=True,
                            location=tmp_data, size_threshold=1024)
            # The model names its data file; rewrite the name before the rename.
            saved = onnx.load(tmp, load_external_data=False)
            for tensor in onnx.external_data_helper._get_all_tensors(saved):
                for entry in tensor.external_data:
                    if entry.key == "location":
                        entry.value = data_name
            with open(tmp, "wb") as f:
                f.write(saved.SerializeToString())
            os.replace(directory / tmp_data, directory / data_name)
        else:
            with open(tmp, "wb") as f:
                f.write(model.SerializeToString())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    size = path.stat().st_size
    if external:
        size += (directory / data_name).stat().st_size
    return size


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__

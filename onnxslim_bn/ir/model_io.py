"""Loading and saving models: clear errors for bad files, a valid input before any work,
outputs that never land on what the run reads, atomic writes, external data."""

from __future__ import annotations

import contextlib
import os
import stat
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
from google.protobuf.message import DecodeError

from ..errors import BnSlimError
from .shapes import skeleton

# A protobuf cannot exceed 2 GiB; models whose weights come near it travel as external data.
PROTO_LIMIT = 2**31 - 2**27


def too_large_for_protobuf(model: onnx.ModelProto) -> bool:

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


# ---------------------------------------------------------------- the files a run reads


def external_data_files(model: onnx.ModelProto, folder: Path, source: str) -> dict[str, Path]:
    """Tensor name -> the file its external data lives in, checked: a plain file inside the
    model's folder (onnx and onnxruntime refuse anything else), present."""
    found: dict[str, Path] = {}
    for tensor in _external_tensors(model):
        location = next((e.value for e in tensor.external_data if e.key == "location"), "")
        where = Path(location)
        if not location or where.is_absolute() or ".." in where.parts:
            raise BnSlimError(f"{source}: tensor '{tensor.name}' keeps its weights in '{location}', outside the model's "
                              "folder; move the data file beside the model and name it by its file name")
        file = folder / where
        if file.is_symlink():
            raise BnSlimError(f"{source}: tensor '{tensor.name}' keeps its weights in '{location}', a symbolic link "
                              "(onnx refuses those); replace the link by a copy of the file (cp -L)")
        if not file.is_file():
            raise BnSlimError(f"{source}: tensor '{tensor.name}' keeps its weights in '{location}', which is missing "
                              f"beside the model in {folder}; copy the data file there")
        found[tensor.name] = file
    return found


def _external_tensors(model: onnx.ModelProto):
    for tensor in onnx.external_data_helper._get_all_tensors(model):
        if tensor.HasField("data_location") and tensor.data_location == onnx.TensorProto.EXTERNAL:
            yield tensor


def model_files(path: str | os.PathLike) -> list[tuple[str, Path]]:
    """What reading the model at ``path`` reads: the file and every external data file it names,
    each with a description for messages (reads the model's structure, not its external weights)."""
    path = Path(path)
    files = [("the input model", path)]
    if not path.is_file():
        return files  # loading it will say what is wrong
    try:
        model = onnx.load(str(path), load_external_data=False)
    except (DecodeError, ValueError, RuntimeError, OSError):
        return files
    seen = set()
    for file in external_data_files(model, path.parent, str(path)).values():
        if file not in seen:
            seen.add(file)
            files.append(("the input's external data", file))
    return files


def load_model(path: str | os.PathLike) -> onnx.ModelProto:
    """Load an ONNX file (with its external data) or raise one clear BnSlimError."""
    return load_model_and_files(path)[0]


def load_model_and_files(path: str | os.PathLike) -> tuple[onnx.ModelProto, list[Path]]:
    """:func:`load_model`, and the files it read (the model, then its external data files)."""
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
    data = external_data_files(model, path.parent, str(path))
    try:
        onnx.external_data_helper.load_external_data_for_model(model, str(path.parent))
    except (OSError, ValueError, onnx.checker.ValidationError) as exc:
        raise BnSlimError(f"{path}: its external weight data cannot be read ({_first_line(exc)}); "
                          "keep the complete .data file beside the model") from exc
    return model, [path] + sorted(set(data.values()))


# ---------------------------------------------------------------- the input is valid before any work


def check_input(model: onnx.ModelProto, source: str, copy: bool = False) -> tuple[onnx.ModelProto, list[str]]:
    """onnx.checker (full check) on the input, on a weight-less copy (cheap at any size).

    A model whose only fault is a declared output / value_info shape that shape inference
    contradicts (a PP-OCRv5 export declares its output rank 0; onnxruntime runs it) has those
    entries dropped (in place, or in a copy with ``copy``), with a note each: returns the
    model to use and the notes. Any other fault is one BnSlimError naming it.
    """

    error = _checker_error(skeleton(model, None))
    if error is None:
        return model, []
    stale = _stale_shapes(model)
    if stale and copy:
        model = _copy(model)
        stale = _stale_shapes(model)
    if not stale:
        raise BnSlimError(f"{source}: the input model fails the ONNX checker ({error}); "
                          "fix or re-export the model: onnx-bnslim prunes valid models only")
    notes = []
    for value, kind, declared, inferred, shape in stale:
        # a graph output needs a shape to pass the checker: it takes the inferred one
        value.type.tensor_type.shape.CopyFrom(shape) if kind == "output" else value.type.tensor_type.ClearField("shape")
        notes.append(f"dropped the stale declared shape of {kind} '{value.name}' ({_shape_words(declared, inferred)})"
                     + (", using the inferred one" if kind == "output" else ""))
    kept = [v for v in model.graph.value_info if v.type.tensor_type.HasField("shape")]
    del model.graph.value_info[:]
    model.graph.value_info.extend(kept)
    after = _checker_error(skeleton(model, None))
    if after is not None:
        raise BnSlimError(f"{source}: the input model fails the ONNX checker ({after}); "
                          "fix or re-export the model: onnx-bnslim prunes valid models only")
    return model, notes


def _copy(model: onnx.ModelProto) -> onnx.ModelProto:
    out = onnx.ModelProto()
    out.CopyFrom(model)
    return out


def _checker_error(model: onnx.ModelProto) -> str | None:
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        return _first_line(exc)
    return None


def _declared(value: onnx.ValueInfoProto) -> list | None:
    tensor_type = value.type.tensor_type
    if not tensor_type.HasField("shape"):
        return None
    return [d.dim_value if d.HasField("dim_value") else None for d in tensor_type.shape.dim]


def _stale_shapes(model: onnx.ModelProto) -> list[tuple[onnx.ValueInfoProto, str, list, list, onnx.TensorShapeProto]]:
    """Declared output / value_info shapes that contradict shape inference run without them."""

    bare = skeleton(model, None)
    for value in bare.graph.output:
        value.type.tensor_type.ClearField("shape")
    del bare.graph.value_info[:]
    try:
        inferred = onnx.shape_inference.infer_shapes(bare, data_prop=True)
    except onnx.shape_inference.InferenceError:
        return []
    found = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    stale = []
    for kind, values in (("output", model.graph.output), ("value_info", model.graph.value_info)):
        for value in values:
            declared, got = _declared(value), _declared(found[value.name]) if value.name in found else None
            if declared is None or got is None:
                continue
            if len(declared) != len(got) or any(a is not None and b is not None and a != b for a, b in zip(declared, got)):
                stale.append((value, kind, declared, got, found[value.name].type.tensor_type.shape))
    return stale


def _shape_words(declared: list, inferred: list) -> str:
    if len(declared) != len(inferred):
        return f"rank {len(declared)}; inferred rank {len(inferred)}"
    def spell(s):
        return "[" + ", ".join("?" if d is None else str(d) for d in s) + "]"
    return f"declared {spell(declared)}; inferred {spell(inferred)}"


# ---------------------------------------------------------------- where the outputs go


@dataclass(frozen=True)
class Target:
    """Where an output's bytes land. ``stream``: a device or FIFO, written through (opened for
    writing, never replaced); otherwise a regular file (or none yet) at ``real``, the target of
    any symlink, replaced atomically so that the link stays a link."""

    path: Path
    real: Path
    stream: bool


def target(path: str | os.PathLike, flag: str, streams: bool = True) -> Target:
    """Classify an output path, or raise one line for a path it cannot be written to."""
    path = Path(path)
    try:
        mode = os.stat(path).st_mode  # through symlinks, /dev/stdout and /dev/fd/N included
    except (FileNotFoundError, NotADirectoryError):
        mode = None  # absent (or a dangling link), or a parent is a file: reported below
    except OSError as exc:
        raise BnSlimError(f"{flag} {path}: cannot be written ({_first_line(exc)}); pass another {flag}") from exc
    if mode is not None and stat.S_ISDIR(mode):
        raise BnSlimError(f"{flag} {path}: is a folder; pass a file path such as {path / 'model.slim.onnx'}"
                          if flag == "-o" else f"{flag} {path}: is a folder; pass a file path")
    if mode is not None and (stat.S_ISCHR(mode) or stat.S_ISFIFO(mode) or stat.S_ISBLK(mode)):
        if not streams:
            raise BnSlimError(f"{flag} {path}: is a device or pipe; these files need a folder of their own, pass another {flag}")
        return Target(path, path, True)
    if mode is not None and not stat.S_ISREG(mode):
        raise BnSlimError(f"{flag} {path}: is not a regular file (a socket?); pass a file path")
    real = Path(os.path.realpath(path))
    if not real.parent.is_dir():
        raise BnSlimError(f"{path}: the output folder {path.parent} does not exist; create it or pass another {flag}")
    if not os.access(real.parent, os.W_OK):
        raise BnSlimError(f"{path}: the output folder {real.parent} is not writable; pass another {flag}")
    return Target(path, real, False)


def _same(a: Path, b: Path) -> bool:
    if os.path.realpath(a) == os.path.realpath(b):
        return True
    try:
        return os.path.samefile(a, b)  # hard links
    except OSError:
        return False


def plan_outputs(reads: list[tuple[str, str | os.PathLike]],
                 writes: dict[str, str | os.PathLike | list[str | os.PathLike] | None]) -> dict[str, list[Target]]:
    """Check, before any work, that no output lands on a file the run reads or on another output.

    ``reads``: (description, path) of every file read (see :func:`model_files`, ``--data``).
    ``writes``: flag -> path(s) it may write (None: not given). A flag ending in ``!`` takes
    only regular files (files written in pairs, e.g. OpenVINO IR); the ``!`` is dropped from
    messages. Devices and FIFOs are written through and exempt from overlap checks (``-o
    /dev/null --report /dev/null`` is fine). Returns the classified targets per flag.
    """
    planned: dict[str, list[Target]] = {}
    for flag, paths in writes.items():
        if paths is None:
            continue
        name, streams = flag.rstrip("!"), not flag.endswith("!")
        paths = paths if isinstance(paths, list) else [paths]
        planned[flag] = [target(p, name, streams) for p in paths]
    files = [(flag.rstrip("!"), t) for flag, ts in planned.items() for t in ts if not t.stream]
    for flag, t in files:
        for what, read in reads:
            if read is not None and _same(t.path, Path(read)):
                raise BnSlimError(f"{flag} {t.path}: would overwrite {what} {read}; pass another {flag}")
    for i, (flag, t) in enumerate(files):
        for other_flag, other in files[:i]:
            if _same(t.real, other.real):
                raise BnSlimError(f"{flag} {t.path}: is the same file as {other_flag} {other.path}; "
                                  f"pass different paths")
    return planned


def data_path(model_path: str | os.PathLike) -> Path:
    """The external-data file :func:`save_model` writes beside ``model_path`` (when needed)."""
    model_path = Path(model_path)
    return model_path.with_name(model_path.name + ".data")


@contextlib.contextmanager
def _staged(path: Path, flag: str = "the output"):
    """A path to write ``path``'s content to; it replaces ``path``'s real file (a symlink's
    target) in one rename on success."""
    real = target(path, flag, streams=False).real
    with tempfile.TemporaryDirectory(prefix=f".{real.name}.", dir=real.parent) as tmp:
        staged = Path(tmp) / real.name
        yield staged
        os.replace(staged, real)


def write_text(path: str | os.PathLike, text: str, flag: str = "the output") -> None:
    """Write a text file (a JSON report): atomically for a file (through a symlink to its
    target), written through for a device or pipe (``/dev/stdout``, ``>(jq .)``)."""
    out = target(path, flag)
    if out.stream:
        with open(out.path, "w") as stream:
            stream.write(text)
        return
    with _staged(out.path, flag) as staged:
        staged.write_text(text)


def save_model(model: onnx.ModelProto, path: str | os.PathLike, flag: str = "the output") -> int:
    """Write ``model`` to ``path`` atomically (staged, then renamed); return its size in bytes.

    Models too large for one protobuf are written with their weights in ``<name>.data``; the
    data file is moved in first, so the model never names a data file that is not there. A
    device or pipe (``-o /dev/null``) is written through; a symlink's target is replaced.
    """
    out = target(path, flag)
    external = too_large_for_protobuf(model)
    if out.stream:
        if external:
            raise BnSlimError(f"{path}: a model over 2 GB is written with a .data file beside it; "
                              "pass a file path, not a device or pipe")
        data = model.SerializeToString()
        with open(out.path, "wb") as stream:
            stream.write(data)
        return len(data)
    if external and out.path.is_symlink():
        raise BnSlimError(f"{path}: a model over 2 GB names its .data file relative to where it is opened; "
                          "pass the real path, not a symbolic link")
    data = data_path(out.real)
    if external and (data.is_symlink() or data.exists() and not data.is_file()):
        raise BnSlimError(f"{data}: the model's external data goes here, but it is not a regular file "
                          "(onnx refuses links there); remove it or pass another path")
    with _staged(out.real, flag) as staged:
        if external:
            _save_external(model, staged)
            os.replace(staged.with_name(data_path(staged).name), data)
        else:
            staged.write_bytes(model.SerializeToString())
    return out.real.stat().st_size + (data.stat().st_size if external else 0)


STDOUT = "-"  # an output path meaning standard output (written through, never checked as a file)


def check_run_files(models: list[str | os.PathLike], writes: dict[str, str | os.PathLike | None],
                    data: object = None, openvino: tuple[str | os.PathLike, str] | None = None) -> None:
    """The CLI's one check before any work: every output a run may write (``writes``: flag ->
    path; ``-o`` brings its ``.data`` file, ``openvino`` = (folder, name) its ``.xml`` / ``.bin``)
    against every file it reads (``models`` with their external data, ``data`` when a path)
    and against each other. Raises one BnSlimError line; see :func:`plan_outputs`."""
    reads: list[tuple[str, str | os.PathLike]] = []
    for model in models:
        reads.extend(model_files(model))
    if isinstance(data, (str, os.PathLike)):
        reads.append(("the --data file", data))
    planned = {flag: path for flag, path in writes.items() if path is not None and str(path) != STDOUT}
    output = planned.get("-o")
    if output is not None and not target(output, "-o").stream:
        planned["-o (its external data file)!"] = data_path(Path(os.path.realpath(output)))
    if openvino is not None:
        folder, name = Path(openvino[0]), openvino[1]
        if folder.exists() and not folder.is_dir():
            raise BnSlimError(f"--openvino {folder}: is not a folder; pass a folder for the IR files")
        if folder.is_dir():
            planned["--openvino!"] = [folder / f"{name}.xml", folder / f"{name}.bin"]
        for suffix in (".xml", ".bin"):
            if (folder / f"{name}{suffix}").is_symlink():
                raise BnSlimError(f"--openvino {folder / (name + suffix)}: is a symbolic link; "
                                  "the IR files are replaced by renames: pass another folder")
    plan_outputs(reads, planned)


def graphs(graph: onnx.GraphProto):
    """``graph`` and every subgraph inside it (If branches, Loop and Scan bodies), depth first."""
    yield graph
    for node in graph.node:
        for a in node.attribute:
            for sub in ([a.g] if a.type == onnx.AttributeProto.GRAPH else
                        list(a.graphs) if a.type == onnx.AttributeProto.GRAPHS else []):
                yield from graphs(sub)


def model_bytes(model: onnx.ModelProto) -> int:
    """The model's size as a file (its serialized size), or the weights' bytes for a model
    protobuf cannot hold in one file: what the report's "Model size" row compares."""
    return weight_bytes(model) if too_large_for_protobuf(model) else model.ByteSize()


def weight_bytes(model: onnx.ModelProto) -> int:
    """Bytes of the initializers (of If / Loop / Scan bodies too), without serializing the
    model (ByteSize() would, in full)."""
    total = 0
    for t in (t for g in graphs(model.graph) for t in g.initializer):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type else np.dtype(np.float32)
        total += int(np.prod(t.dims)) * dtype.itemsize
    return total

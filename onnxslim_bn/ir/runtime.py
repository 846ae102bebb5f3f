"""Running models in onnxruntime: THE session factory and THE chunked runner.

Every stage that runs a model goes through :func:`session` (the check, calibration, the refit,
quantization's sensitivity, the border maps of a padded Conv, bench and the latency table), so
the settings that matter -- graph optimizations, threads, spinning, profiling, intermediate
tensors as outputs, models past protobuf's 2 GB -- are written once, as arguments.

Samples go through :func:`run` (all of them, a last partial fixed batch padded) or
:func:`stream` (chunk by chunk for reducers, whole fixed batches only).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import onnx

from ..errors import BnSlimError
from .model_io import as_file, too_large_for_protobuf

log = logging.getLogger(__name__)

CHUNK = 256  # samples per onnxruntime run of :func:`run` when the batch size is dynamic, at most ...
# ... and at most this many input bytes: onnxruntime's arena keeps the peak of a run for the session's
# life, and a ResNet-50 at 224x224 (0.6 MB of input per sample) peaks ~11 MB a sample -- the check's
# 128 samples in one run held 1.4 GB in the original's session and as much again in the pruned one's
# (4.8 GB peak for a --data run); 8 MB of input keeps a run of it near 150 MB
RUN_BYTES = 8 * 2**20
STREAM_CHUNK = 32  # of :func:`stream`: one chunk of a large activation stays in memory, and it is fast


def session(model: onnx.ModelProto | bytes | str | Path, what: str, *, optimized: bool = False, threads: int | None = None,
            timing: bool = False, profile: str | None = None, extra_outputs: Sequence[str] = ()):
    """An onnxruntime CPU session of ``model`` (in memory, serialized, or a file's path).

    ``optimized``: onnxruntime's graph optimizations all on, as deployed (an INT8 QDQ model then
    runs the INT8 kernels, not its float simulation); off, the graph runs as written (the check:
    on a 1 GB model the optimizer alone costs 9 s and 3 GB). ``threads``: intra-op threads, one
    inter-op thread. ``timing``: sessions timed alternately must not spin-wait for work after a
    run: one would steal the cores the other needs, and whichever runs second would look slower
    than it is. ``profile``: a profile file prefix (read it with ``end_profiling()``).
    ``extra_outputs``: intermediate tensors made outputs for this session only (a model in
    memory is left exactly as it was). A model past protobuf's 2 GB is loaded from a temporary
    file with external data. Failing to load is a :class:`BnSlimError` naming ``what``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL if optimized else \
        ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    if threads is not None:
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
    if timing:
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        options.add_session_config_entry("session.inter_op.allow_spinning", "0")
    if profile:
        options.enable_profiling = True
        options.profile_file_prefix = profile
    added = []
    if isinstance(model, onnx.ModelProto):
        known = {o.name for o in model.graph.output}
        added = [onnx.helper.make_empty_tensor_value_info(n) for n in dict.fromkeys(extra_outputs) if n not in known]
        model.graph.output.extend(added)
    elif extra_outputs:
        raise ValueError("extra outputs need a model in memory")
    try:
        with _source(model) as source:
            return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        raise BnSlimError(f"{what}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from exc
    finally:
        for _ in added:
            model.graph.output.pop()


@contextlib.contextmanager
def _source(model: onnx.ModelProto | bytes | str | Path) -> Iterator[bytes | str]:
    """What onnxruntime loads: a path, the serialized model, or past 2 GB a temporary file."""
    if isinstance(model, bytes):
        yield model
    elif not isinstance(model, onnx.ModelProto):
        yield str(model)
    elif not too_large_for_protobuf(model):
        yield model.SerializeToString()
    else:
        with as_file(model) as path:  # over 2 GB: from a file with external data
            yield str(path)


def count(feeds: dict[str, np.ndarray]) -> int:
    """Samples in ``feeds``: the shortest axis 0 (scalar inputs, fed whole to every chunk, aside)."""
    return min((len(v) for v in feeds.values() if v.ndim), default=1 if feeds else 0)


def pad(feeds: dict[str, np.ndarray], batch: int | None) -> dict[str, np.ndarray]:
    """``feeds`` padded to whole batches of a fixed ``batch`` with copies of the last sample."""
    n = count(feeds)
    extra = -n % batch if batch and n else 0
    if not extra:
        return feeds
    return {k: np.concatenate([v, np.repeat(v[-1:], extra, axis=0)]) if v.ndim else v for k, v in feeds.items()}


def _batch_axis(shape: tuple[int, ...], size: int) -> int | None:
    """An output's batch axis: the first as long as the samples run (axis 0 when none is; None for scalars)."""
    return next((a for a, d in enumerate(shape) if d == size), 0) if shape else None


def first_samples(outputs: list[np.ndarray], n: int, total: int) -> list[np.ndarray]:
    """The outputs of the first ``n`` of ``total`` samples (padding dropped)."""
    if n == total:
        return outputs
    out = []
    for o in outputs:
        axis = _batch_axis(o.shape, total)
        out.append(o if axis is None or o.shape[axis] != total else np.take(o, np.arange(n), axis=axis))
    return out


def run(sess, feeds: dict[str, np.ndarray], batch: int | None, outputs: list[str] | None = None) -> list[np.ndarray]:
    """Run a session (all outputs, or the named ones) over every sample of ``feeds``.

    ``batch`` is the model's fixed batch size: samples go in chunks of exactly that many, the
    last padded with copies of its last sample and the padding's outputs dropped. With a
    dynamic batch (None) they go ``CHUNK`` at a time, fewer where a chunk's inputs would pass
    ``RUN_BYTES`` (at least one). Chunks are joined along each output's batch axis (the first
    axis as long as the chunk; axis 0 when none is)."""
    n = count(feeds)
    feeds = pad(feeds, batch)
    total = count(feeds)
    per_sample = sum(v.nbytes // max(len(v), 1) for v in feeds.values() if v.ndim)
    step = batch or max(1, min(CHUNK, RUN_BYTES // max(per_sample, 1)))
    parts_of = [sess.run(outputs, {k: v[i : i + step] if v.ndim else v for k, v in feeds.items()})
                for i in range(0, max(total, 1), step)]
    joined = []
    for parts in zip(*parts_of):
        axis = _batch_axis(parts[0].shape, min(step, total))
        joined.append(parts[0] if len(parts) == 1 or axis is None else np.concatenate(parts, axis=axis))
    return first_samples(joined, n, total)


def chunks(feeds: dict[str, np.ndarray], batch: int | None,
           step: int | None = None) -> Iterator[tuple[np.ndarray, dict[str, np.ndarray]]]:
    """(sample indices, feeds) per chunk: the model's fixed batch size, else ``step`` samples
    (default ``STREAM_CHUNK``). With a fixed batch, a last partial batch is left out (with a
    warning): padding it would count its copies in every statistic reduced over the chunks."""
    step = batch or step or STREAM_CHUNK
    n = count(feeds)  # rank-0 inputs (0-d arrays) are fed whole to every chunk
    if batch and n % batch:
        log.warning("calibration: %d samples is not a multiple of the fixed batch %d; the last %d are not used",
                    n, batch, n % batch)
        n -= n % batch
    for start in range(0, n, step):
        stop = min(n, start + step)
        yield np.arange(start, stop), {k: v[start:stop] if np.ndim(v) else v for k, v in feeds.items()}


def stream(sess, feeds: dict[str, np.ndarray], outputs: list[str], batch: int | None,
           step: int | None = None) -> Iterator[tuple[np.ndarray, list[np.ndarray]]]:
    """(sample indices, values of ``outputs``) per chunk of :func:`chunks`, one run each."""
    for samples, chunk in chunks(feeds, batch, step):
        yield samples, sess.run(outputs, chunk)

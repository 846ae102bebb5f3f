"""Latency of the original and the pruned model side by side, in onnxruntime and OpenVINO.

The two models run interleaved (A B A B ...) after a warm-up, so that a shared, noisy machine
slows both alike; the table quotes medians, the 10th-90th percentile spread, the measured
speed-up, the ideal one (the MAC ratio) and their quotient.
"""

from __future__ import annotations

import logging
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .errors import BnSlimError
from .metrics import measure
from .model_io import load_model
from .report import grid
from .shapes import infer_shapes, resolve_input_shapes
from .verify import make_inputs, static_batch

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = np.asarray(seconds) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90)))


@dataclass
class BenchRow:
    runtime: str
    batch: int
    original: Timing
    pruned: Timing
    ideal: float  # MACs(original) / MACs(pruned)

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.pruned.median_ms

    @property
    def efficiency(self) -> float:
        return self.speedup / self.ideal

    def to_dict(self) -> dict:
        return {**asdict(self), "speedup": self.speedup, "efficiency": self.efficiency}


@dataclass
class BenchResult:
    original: str
    pruned: str
    threads: int
    runs: int
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"original": self.original, "pruned": self.pruned, "threads": self.threads, "runs": self.runs,
                "rows": [r.to_dict() for r in self.rows], "notes": self.notes}

    def table(self, markdown: bool = False) -> str:
        head = ("Runtime", "Batch", "Original ms", "Pruned ms", "Speed-up", "Ideal (MACs)", "Measured / ideal")
        body = [(r.runtime, str(r.batch), _fmt(r.original), _fmt(r.pruned), f"{r.speedup:.2f}x",
                 f"{r.ideal:.2f}x", f"{r.efficiency:.2f}") for r in self.rows]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body]
        else:
            lines = grid(head, body)
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def _fmt(t: Timing) -> str:
    return f"{t.median_ms:.3f} ({t.p10_ms:.3f}-{t.p90_ms:.3f})"


class _Progress:
    """A one-line progress bar on stderr (silent when disabled)."""

    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def step(self, label: str) -> None:
        self.done += 1
        if self.enabled:
            filled = int(30 * self.done / self.total)
            sys.stderr.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<24}")
            sys.stderr.flush()

    def close(self) -> None:
        if self.enabled:
            sys.stderr.write("\n")


def _ort_runner(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.log_severity_level = 3
    # Interleaved sessions must not spin-wait for work after a run: one would steal the cores
    # the other needs, and whichever runs second would look slower than it is.
    options.add_session_config_entry("session.intra_op.allow_spinning", "0")
    sess = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return lambda feeds: sess.run(None, feeds)


def _ov_runner(path: Path, threads: int):
    from .openvino_ir import compile_cpu

    compiled = compile_cpu(str(path), threads)
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)


_RUNNERS = {"onnxruntime": _ort_runner, "openvino": _ov_runner}


def benchmark(original: str | os.PathLike, pruned: str | os.PathLike, batches: tuple[int, ...] = (1, 32),
              threads: int | None = None, runs: int = 30, warmup: int = 5, runtimes: tuple[str, ...] = RUNTIMES,
              input_shapes: dict[str, list[int]] | None = None, progress: bool = False) -> BenchResult:
    """Time both models; every batch size and runtime is one row."""
    threads = threads or os.cpu_count() or 1
    paths = [Path(original), Path(pruned)]
    models = [load_model(p) for p in paths]
    for name in runtimes:
        if name not in _RUNNERS:
            raise BnSlimError(f"unknown runtime '{name}'; choose from {', '.join(RUNTIMES)}")
    if runs < 1 or warmup < 0:
        raise BnSlimError("--runs must be at least 1 and --warmup at least 0")
    result = BenchResult(str(paths[0]), str(paths[1]), threads, runs)
    ideal = _mac_ratio(models, input_shapes or {}, str(paths[0]))
    bar = _Progress(len(runtimes) * len(batches) * (warmup + runs), progress)
    for runtime in runtimes:
        runners = [_RUNNERS[runtime](p, threads) for p in paths]
        for batch in batches:
            feeds = _feeds(models[0], input_shapes or {}, batch, str(paths[0]))
            if feeds is None:
                result.notes.append(f"batch {batch} skipped: the model's batch size is fixed")
                bar.done += warmup + runs
                continue
            times: list[list[float]] = [[], []]
            for i in range(warmup + runs):
                for k, run in enumerate(runners):  # A B A B ...: both see the same machine load
                    start = time.perf_counter()
                    run(feeds)
                    if i >= warmup:
                        times[k].append(time.perf_counter() - start)
                bar.step(f"{runtime} batch {batch}")
            result.rows.append(BenchRow(runtime, batch, Timing.of(times[0]), Timing.of(times[1]), ideal))
    bar.close()
    return result


def _mac_ratio(models: list[onnx.ModelProto], given: dict[str, list[int]], source: str) -> float:
    macs = []
    for model in models:
        shapes, _ = resolve_input_shapes(model, given, source)
        macs.append(measure(gs.import_onnx(model), infer_shapes(model, shapes, source), 0).macs)
    if not macs[1]:
        raise BnSlimError(f"{source}: the pruned model has no MACs to count; are these the right two files?")
    return macs[0] / macs[1]


def _feeds(model: onnx.ModelProto, given: dict[str, list[int]], batch: int, source: str) -> dict[str, np.ndarray] | None:
    """Seeded inputs of this batch size; None when the model fixes another."""
    if static_batch(model) not in (None, batch):
        return None
    shapes, _ = resolve_input_shapes(model, given, source)
    return make_inputs(model, {k: [batch, *v[1:]] for k, v in shapes.items()}, None, seed=0)[0]

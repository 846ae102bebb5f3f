"""Latency of the original and the pruned model side by side, in onnxruntime and OpenVINO, measured
so that the comparison cannot fool its reader.

- Only two models that take the same inputs and give the same outputs (names, ranks, dtypes) are
  compared.
- One runtime per round: both models' sessions of one runtime exist while it is timed, then are
  released; the other runtime's threads are never running beside them.
- Within a round the models alternate, in every order in turn, so none always runs second.
- A second copy of the original runs beside them, as often: the A/A noise band (:mod:`.noise`).
  A row is called slower (or faster) only when its ratio falls outside that band.
- onnxruntime sessions do not spin-wait after a run (intra- and inter-op): a spinning session
  steals the cores of the one timed next.
- Several rounds (4 by default), sessions built afresh each time; the models take turns in the
  first slot (built and run first), which ran a copy of the same model up to 17% faster in
  OpenVINO at 0.1 ms. The table quotes the median over all runs
  and the 10th-90th percentile spread, and warns when the spread is wide (p90 / p10 > 1.3).

Also :func:`probe`, the quick check after pruning that the pruned model is faster, naming the
layers that grew when it is not.
"""

from __future__ import annotations

import gc
import itertools
import json
import logging
import os
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TextIO

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..errors import BnSlimError
from ..ir import openvino_ir
from ..ir.data import load as load_samples
from ..ir.model_io import as_file, load_model
from ..ir.runtime import session
from ..ir.shapes import graph_inputs, infer_shapes, resolve_input_shapes
from ..ir.weights import LAYER_OPS
from ..passes.metrics import measure
from ..passes.verify import concrete_shapes, make_inputs, open_layer_shapes, static_batch
from .noise import ZERO, NoiseBand, noise_band
from .report import grid

log = logging.getLogger(__name__)

RUNTIMES = ("onnxruntime", "openvino")
WIDE_SPREAD = 1.3  # p90 / p10 above this: the machine was busy, the medians are less sure


@dataclass
class Timing:
    median_ms: float
    p10_ms: float
    p90_ms: float

    @classmethod
    def of(cls, seconds: list[float]) -> Timing:
        ms = np.asarray(seconds) * 1e3
        return cls(float(np.median(ms)), float(np.percentile(ms, 10)), float(np.percentile(ms, 90)))

    @property
    def spread(self) -> float:
        return self.p90_ms / self.p10_ms if self.p10_ms > 0 else float("inf")


@dataclass
class BenchRow:
    runtime: str
    batch: int
    original: Timing
    pruned: Timing
    ideal: float  # MACs(original) / MACs(pruned)
    round_speedups: list[float] = field(default_factory=list)  # ratio of the medians, one per round
    band: NoiseBand = ZERO  # the original against a copy of itself, timed as often (:mod:`.noise`)

    @property
    def speedup(self) -> float:
        return self.original.median_ms / self.pruned.median_ms

    @property
    def verdict(self) -> str:
        """'faster', 'same' or 'slower': the pruned model against its A/A band."""
        return self.band.verdict(self.pruned.median_ms / self.original.median_ms)

    @property
    def efficiency(self) -> float:
        return self.speedup / self.ideal

    def to_dict(self) -> dict:
        return {**asdict(self), "band": self.band.to_dict(), "speedup": self.speedup, "efficiency": self.efficiency,
                "verdict": self.verdict}


@dataclass
class BenchResult:
    original: str
    pruned: str
    threads: int
    runs: int
    rounds: int = 1
    rows: list[BenchRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"original": self.original, "pruned": self.pruned, "threads": self.threads, "runs": self.runs,
                "rounds": self.rounds, "rows": [r.to_dict() for r in self.rows], "notes": self.notes}

    def table(self, markdown: bool = False) -> str:
        head = ("Runtime", "Batch", "Original ms", "Pruned ms", "Speed-up", "Rounds", "A/A band", "Ideal (MACs)",
                "Measured / ideal")
        body = [(r.runtime, str(r.batch), _fmt(r.original), _fmt(r.pruned), f"{r.speedup:.2f}x" + _MARK[r.verdict],
                 _rounds(r.round_speedups), f"{r.band.low:.2f}-{r.band.high:.2f}x", f"{r.ideal:.2f}x",
                 f"{r.efficiency:.2f}") for r in self.rows]
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body]
        else:
            lines = grid(head, body)
        if markdown and self.notes:
            lines.append("")  # a line right below a Markdown table would join it
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


_MARK = {"faster": "", "same": " (noise)", "slower": " (slower)"}  # the speed-up against its A/A band


def _fmt(t: Timing) -> str:
    return f"{t.median_ms:.3f} ({t.p10_ms:.3f}-{t.p90_ms:.3f})"


def _rounds(speedups: list[float]) -> str:
    """The per-round speed-ups' range: how much one round alone could have said otherwise."""
    if len(speedups) < 2:
        return "-"
    return f"{min(speedups):.2f}-{max(speedups):.2f}x"


class _Progress:
    """Progress on a stream: a bar redrawn in place on a terminal, one line per step elsewhere
    (logs, CI), nothing when disabled."""

    def __init__(self, total: int, enabled: bool, stream: TextIO | None = None):
        self.stream = stream or sys.stderr
        self.total, self.done, self.enabled = total, 0, enabled
        self.tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()
        self.clock = time.perf_counter()

    def step(self, label: str) -> None:
        self.done += 1
        if not self.enabled:
            return
        if self.tty:
            filled = int(30 * self.done / self.total)
            self.stream.write(f"\r[{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} {label:<32}")
        else:
            self.stream.write(f"bench: {self.done}/{self.total} {label} ({time.perf_counter() - self.clock:.1f} s)\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


def _ort_runner(path: Path, threads: int) -> Callable[[dict], object]:
    sess = session(path, str(path), optimized=True, threads=threads, timing=True)
    return lambda feeds: sess.run(None, feeds)


def _ov_runner(path: Path, threads: int) -> Callable[[dict], object]:
    compiled = openvino_ir.compile_cpu(str(path), threads)
    request = compiled.create_infer_request()
    return lambda feeds: request.infer(feeds)


_RUNNERS = {"onnxruntime": _ort_runner, "openvino": _ov_runner}


def _runtimes(asked: tuple[str, ...], notes: list[str]) -> tuple[str, ...]:
    for name in asked:
        if name not in _RUNNERS:
            raise BnSlimError(f"unknown runtime '{name}'; choose from {', '.join(RUNTIMES)}")
    if "openvino" in asked and not openvino_ir.available():
        rest = tuple(r for r in asked if r != "openvino")
        if not rest:
            raise BnSlimError(f"OpenVINO is not installed ({openvino_ir.INSTALL_HINT}); time with onnxruntime instead")
        notes.append(f"OpenVINO is not installed, so only onnxruntime was timed: {openvino_ir.INSTALL_HINT}")
        log.warning("OpenVINO is not installed: timing onnxruntime alone")
        return rest
    return asked


def check_same_interface(first: onnx.ModelProto, second: onnx.ModelProto, names: tuple[str, str]) -> None:
    """Raise when the two models do not take the same inputs and give the same outputs (names,
    ranks, element types): their timings would not compare the same work."""
    for kind, a, b in (("input", graph_inputs(first), graph_inputs(second)),
                       ("output", list(first.graph.output), list(second.graph.output))):
        sig_a, sig_b = [_signature(v) for v in a], [_signature(v) for v in b]
        if sig_a == sig_b:
            continue
        if [s[0] for s in sig_a] != [s[0] for s in sig_b]:
            detail = f"{kind}s {[s[0] for s in sig_a]} vs {[s[0] for s in sig_b]}"
        else:
            x, y = next((x, y) for x, y in zip(sig_a, sig_b) if x != y)
            detail = (f"{kind} '{x[0]}' is rank {x[1]} {_dtype(x[2])} vs rank {y[1]} "
                      f"{_dtype(y[2])}")
        raise BnSlimError(f"{names[0]} and {names[1]} differ in their {detail}; bench compares a model with its own "
                          "pruned version: pass the original and the file onnx-bnslim wrote from it")


def _dtype(elem_type: int) -> str:
    return onnx.TensorProto.DataType.Name(elem_type) if elem_type else "untyped"


def _signature(value: onnx.ValueInfoProto) -> tuple[str, int, int]:
    t = value.type.tensor_type
    return value.name, len(t.shape.dim) if t.HasField("shape") else -1, t.elem_type


def benchmark(original: str | os.PathLike, pruned: str | os.PathLike, batches: tuple[int, ...] = (1, 32),
              threads: int | None = None, runs: int = 30, warmup: int = 5, runtimes: tuple[str, ...] = RUNTIMES,
              input_shapes: dict[str, list[int]] | None = None, progress: bool = False,
              rounds: int = 4, stream: TextIO | None = None, min_seconds: float = 0.0,
              data=None, preprocess: str | None = None) -> BenchResult:
    """Time both models; every runtime and batch size is one row.

    ``runs`` timed runs per model and row in all, spread over ``rounds`` rounds; ``warmup``
    untimed runs of each model start every round; ``min_seconds``: each round of a row is timed
    at least that long (more runs for fast models, see :func:`_alternate`). ``progress``: a bar on
    a terminal, one line per round and runtime otherwise (on ``stream``, stderr by default).
    ``data`` (any form :func:`onnxslim_bn.ir.data.load` reads, with ``preprocess`` for images): the
    models run on these samples (the first of each batch size, :func:`batch_of`) instead of
    seeded random inputs -- the only way to time a model with integer inputs.
    """
    threads = threads or os.cpu_count() or 1
    paths = [Path(original), Path(pruned)]
    models = [load_model(p) for p in paths]
    check_same_interface(models[0], models[1], (str(paths[0]), str(paths[1])))
    notes: list[str] = []
    runtimes, rounds, per_round = _schedule(runtimes, runs, warmup, rounds, notes)
    result = BenchResult(str(paths[0]), str(paths[1]), threads, per_round * rounds, rounds, notes=notes)
    for b in batches:
        if b < 1:
            raise BnSlimError(f"--batch {b}: a batch size must be at least 1, e.g. --batch 1,32")
    samples = None
    if data is not None:
        shapes, _ = resolve_input_shapes(models[0], input_shapes or {}, str(paths[0]))
        loaded = load_samples(data, models[0], shapes, preprocess)
        samples = loaded.arrays
        notes.append(f"inputs: {loaded.describe()} (the first of each batch)")
    elif preprocess:
        raise BnSlimError("--preprocess applies to a folder of images: add --data IMAGE_FOLDER")
    ideal = _mac_ratio(models, input_shapes or {}, str(paths[0]), samples, notes)
    feeds = {b: _feeds(models[0], input_shapes or {}, b, str(paths[0]), samples) for b in batches}
    for b, f in feeds.items():
        if f is None:
            notes.append(f"batch {b} skipped: the model's batch size is fixed at {static_batch(models[0])}")
    batches = tuple(b for b in batches if feeds[b] is not None)
    del models
    load = [_load_average()]
    # original, pruned, per-round speed-ups, the original's copy (the A/A band, :mod:`.noise`)
    times = {(rt, b): ([], [], [], []) for rt in runtimes for b in batches}
    bar = _Progress(rounds * len(runtimes), progress, stream)
    models = (paths[0], paths[1], paths[0])  # original, pruned, the original again
    for r in range(rounds):
        for runtime in runtimes:
            # the models take turns in the first slot (built first, run first): timed against a copy
            # of itself, a 0.1 ms model in the first slot ran 0.83-0.98x the time of the second in
            # OpenVINO, round after round; rotated every round, no model keeps the lucky slot
            order = _ROUND_ORDERS[r % len(_ROUND_ORDERS)]
            runners = [_RUNNERS[runtime](models[k], threads) for k in order]
            for batch in batches:
                a, b, speedups, a2 = times[runtime, batch]
                slots = _alternate(runners, feeds[batch], warmup, per_round, min_seconds)
                got = [slots[order.index(k)] for k in range(3)]
                a.extend(got[0])
                b.extend(got[1])
                a2.extend(got[2])
                speedups.append(float(np.median(got[0]) / np.median(got[1])))
            del runners
            gc.collect()  # release this runtime's sessions and threads before the next round
            bar.step(f"round {r + 1}/{rounds} {runtime} batch {', '.join(map(str, batches))}")
    bar.close()
    load.append(_load_average())
    cores = os.cpu_count() or 1
    if max(load) > cores:
        notes.append(f"the machine was busy: load average {load[0]:.1f} -> {load[1]:.1f} on {cores} cores while timing; "
                     "other processes shared the cores, so absolute times are inflated and ratios noisier")
    wide = []
    for runtime in runtimes:
        for batch in batches:
            a, b, speedups, a2 = times[runtime, batch]
            row = BenchRow(runtime, batch, Timing.of(a), Timing.of(b), ideal, speedups, noise_band(a, a2, b))
            result.rows.append(row)
            if max(row.original.spread, row.pruned.spread) > WIDE_SPREAD:
                wide.append(f"{runtime} batch {batch} ({row.original.spread:.2f} / {row.pruned.spread:.2f})")
    counts = [len(times[key][0]) for key in times]
    if counts and max(counts) > per_round * rounds:
        notes.append(f"each round of a row timed for at least {min_seconds:g} s: the rows ran {min(counts)} to "
                     f"{max(counts)} runs of each model")
    _verdict_notes(result.rows, notes)
    if wide:
        notes.append(f"wide spread, p90/p10 above {WIDE_SPREAD} (original / pruned): {', '.join(wide)}; the machine "
                     "was busy, so those medians are less sure: rerun with more --runs on an idle machine")
    return result


# the slot order (build and first-run order) of each round, 0 the original, 1 pruned, 2 the
# original's copy: any two rounds from the first hold original and pruned in the same slots as
# often (the speed-up's slots are even after 2 and 4 rounds), all three in every slot after 6
_ROUND_ORDERS = ((0, 1, 2), (1, 0, 2), (2, 0, 1), (2, 1, 0), (0, 2, 1), (1, 2, 0))


def _verdict_notes(rows: list[BenchRow], notes: list[str]) -> None:
    """One note for the rows slower beyond their A/A band, one for those inside it."""
    slower = [f"{r.runtime} batch {r.batch} ({r.speedup:.2f}x, {r.band.describe()})" for r in rows if r.verdict == "slower"]
    same = [f"{r.runtime} batch {r.batch} ({r.speedup:.2f}x)" for r in rows if r.verdict == "same"]
    if slower:
        notes.append(f"the pruned model is slower beyond the noise of timing the original against itself in "
                     f"{', '.join(slower)}")
    if same:
        notes.append(f"no difference beyond the A/A band (the original timed against a copy of itself) in "
                     f"{', '.join(same)}")


def _schedule(runtimes, runs: int, warmup: int, rounds: int, notes: list[str]) -> tuple[tuple[str, ...], int, int]:
    """The runtimes to time (a note for those missing), the rounds, and the timed runs per round."""
    if runs < 1 or warmup < 0 or rounds < 1:
        raise BnSlimError("--runs and --rounds must be at least 1 and --warmup at least 0")
    rounds = min(rounds, runs)
    return _runtimes(tuple(runtimes), notes), rounds, -(-runs // rounds)


def _load_average() -> float:
    """The 1-minute load average (0.0 where the system does not report one)."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return 0.0


MAX_RUNS = 5000  # min_seconds never asks for more runs per round than this


def _alternate(runners: list[Callable[[dict], object]], feeds: dict, warmup: int, runs: int,
               min_seconds: float = 0.0) -> list[list[float]]:
    """Seconds per run of each runner, alternating A B, B A, A B, ... after ``warmup`` runs of each
    (three runners: A A' B in each of the six orders in turn, :func:`_orders`).

    ``min_seconds``: at least that long timed (runs added, up to :data:`MAX_RUNS`), as the warm-up
    runs took: a model of 0.1 ms timed 30 times is 3 ms of evidence, one busy millisecond from noise."""
    start = time.perf_counter()
    for _ in range(warmup):
        for run in runners:
            run(feeds)
    if min_seconds > 0 and warmup > 0:
        per_pass = (time.perf_counter() - start) / warmup
        runs = max(runs, min(MAX_RUNS, int(np.ceil(min_seconds / max(per_pass, 1e-9)))))
    times: list[list[float]] = [[] for _ in runners]
    orders = _orders(len(runners))
    for i in range(runs):
        for k in orders[i % len(orders)]:
            start = time.perf_counter()
            runners[k](feeds)
            times[k].append(time.perf_counter() - start)
    return times


def _orders(n: int) -> list[tuple[int, ...]]:
    """The orders passes run the runners in, in turn: A B, B A for two; for three (original, its
    copy, pruned) all six orders, so that each holds each position and precedes each other as often."""
    if n <= 2:
        return [tuple(range(n)), tuple(reversed(range(n)))]
    return list(itertools.permutations(range(n)))


def _mac_ratio(models: list[onnx.ModelProto], given: dict[str, list[int]], source: str,
               samples: dict[str, np.ndarray] | None = None, notes: list[str] | None = None) -> float:
    """MACs(original) / MACs(pruned). Layers whose shapes inference leaves open (a Resize sized
    from an input's values) are counted from one run on the first sample (``samples``, else seeded
    inputs), and a note names them; when no run can give them, the note says they count 0."""
    macs = []
    for k, model in enumerate(models):
        shapes, _ = resolve_input_shapes(model, given, source)
        inferred = infer_shapes(model, shapes, source)
        layers, tensors = open_layer_shapes(model, inferred)
        if layers:
            what = f"{source} (counting layer shapes)" if k == 0 else "the pruned model (counting layer shapes)"
            try:
                feeds = _feeds(model, given, static_batch(model) or 1, source, samples)
                inferred = {**inferred, **concrete_shapes(model, tensors, feeds, what)}
                told = f"counted from the shapes of one run on {'the first --data sample' if samples else 'seeded inputs'}"
            except BnSlimError:
                if samples is not None:
                    raise
                told = "not counted (0): pass --data so that a run can count them"
            if notes is not None and k == 0:
                notes.append(f"shape inference cannot resolve the shapes of {', '.join(layers[:4])}"
                             f"{' and more' if len(layers) > 4 else ''}: their MACs are {told}")
        macs.append(measure(gs.import_onnx(model), inferred, 0).macs)
    if not macs[1]:
        raise BnSlimError(f"{source}: the pruned model has no MACs to count; are these the right two files?")
    return macs[0] / macs[1]


def _feeds(model: onnx.ModelProto, given: dict[str, list[int]], batch: int, source: str,
           samples: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray] | None:
    """Inputs of this batch size: the first ``batch`` of the user's ``samples`` (repeated in
    turn when there are fewer; a rank-0 input's value as given), else seeded random ones. None
    when the model fixes another batch size."""
    if static_batch(model) not in (None, batch):
        return None
    if samples is not None:
        return batch_of(samples, batch)
    shapes, _ = resolve_input_shapes(model, given, source)
    return make_inputs(model, {k: [batch, *v[1:]] for k, v in shapes.items()}, None, seed=0)[0]


def batch_of(samples: dict[str, np.ndarray], batch: int) -> dict[str, np.ndarray]:
    """``batch`` samples of ``samples`` (axis 0): the first ones, cycled through when there are
    fewer; 0-d arrays (rank-0 inputs) as they are."""
    out = {}
    for name, a in samples.items():
        a = np.asarray(a)
        out[name] = a if not a.ndim else np.ascontiguousarray(np.take(a, np.arange(batch) % len(a), axis=0))
    return out


# ---------------------------------------------------------------------------------------------
# the probe after pruning


@dataclass
class Blame:
    """A layer that takes longer in the pruned model than in the original."""

    node: str  # the original graph's node (the layer, when the runtime fused it with what follows)
    op: str
    original_ms: float
    pruned_ms: float  # 0.0 / original_ms 0.0: the node exists in one model only


@dataclass
class ProbeResult:
    """Original and pruned median ms, and the A/A band (:mod:`.noise`) the verdict is read against:
    ``slower`` / ``faster`` only beyond it. Without a band, any difference counts."""

    original_ms: float
    pruned_ms: float
    runs: int
    blame: list[Blame] = field(default_factory=list)
    band: NoiseBand = ZERO

    @property
    def speedup(self) -> float:
        return self.original_ms / self.pruned_ms

    @property
    def ratio(self) -> float:
        """Pruned / original ms."""
        return self.pruned_ms / self.original_ms

    @property
    def verdict(self) -> str:
        return self.band.verdict(self.ratio)

    @property
    def faster(self) -> bool:
        """Faster beyond the A/A band."""
        return self.verdict == "faster"

    @property
    def slower(self) -> bool:
        """Slower beyond the A/A band: the only verdict the tool acts on or warns about."""
        return self.verdict == "slower"

    def _measured(self) -> str:
        band = "" if self.band is ZERO else f", {self.band.describe()}"
        return f"{self.original_ms:.3f} -> {self.pruned_ms:.3f} ms, {self.runs} alternating runs{band}"

    def message(self) -> str | None:
        """One line for the user when the pruned model is slower beyond the noise, else None."""
        if not self.slower:
            return None
        names = ", ".join(f"{b.node} ({b.original_ms:.3f} -> {b.pruned_ms:.3f} ms)" for b in self.blame[:3])
        return (f"the pruned model is slower in onnxruntime ({self.speedup:.2f}x: {self._measured()})"
                + (f"; slower layers: {names}" if names else ""))

    def summary(self) -> str:
        """One line whatever the verdict: the warning, how much faster, or within the noise."""
        if self.slower:
            return self.message()
        if self.faster:
            return f"probe: the pruned model ran {self.speedup:.2f}x faster in onnxruntime ({self._measured()})"
        return (f"probe: the pruned model ran {self.speedup:.2f}x in onnxruntime, within the noise of timing the "
                f"original against itself ({self._measured()}): no difference this timing can see")

    def to_dict(self) -> dict:
        return {**asdict(self), "band": self.band.to_dict(), "speedup": self.speedup, "faster": self.faster,
                "slower": self.slower, "verdict": self.verdict}


def probe_inputs(model: onnx.ModelProto, input_shapes: dict[str, list[int]] | None = None, batch: int = 1,
                 source: str = "the model", samples: dict[str, np.ndarray] | None = None) -> dict[str, np.ndarray]:
    """Inputs for :func:`probe` at ``batch`` (the model's own batch size when it fixes one): the
    user's ``samples`` when given (``--data``, see :func:`batch_of`), else seeded random ones."""
    fixed = static_batch(model)
    return _feeds(model, input_shapes or {}, fixed or batch, source, samples)


PROBED = ("the original model", "the pruned model", "the original model (its copy)")  # slots 0, 1, 2


def probe(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray], runs: int = 10,
          threads: int | None = None, warmup: int = 2, profile_runs: int = 3,
          min_seconds: float = 0.2, rounds: int = 3) -> ProbeResult:
    """A quick check that ``pruned`` is faster than ``original`` in onnxruntime on ``feeds``.

    ``rounds`` rounds, sessions built afresh each time in the rotating slot orders of
    :func:`benchmark`; in each, ``runs`` alternating runs of each (spinning off) after ``warmup``,
    more when that takes less than ``min_seconds`` (10 runs of a 0.2 ms model once put two
    identical models 0.79x apart). A second session of the original runs interleaved with both,
    as often: the A/A band (:mod:`.noise`) the verdict is read against. When the pruned model is
    slower beyond it, both are profiled (onnxruntime's profiler, ``profile_runs`` runs) and the
    nodes whose time grew are named, most grown first.
    """
    threads = threads or os.cpu_count() or 1
    models = (original, pruned, original)
    times: list[list[float]] = [[], [], []]
    for r in range(max(rounds, 1)):
        order = _ROUND_ORDERS[r % len(_ROUND_ORDERS)]
        sessions = [session(models[k], PROBED[k], optimized=True, threads=threads, timing=True) for k in order]
        runners = [lambda f, s=s: s.run(None, f) for s in sessions]
        got = _alternate(runners, feeds, warmup, max(runs, 1), min_seconds)
        for k in range(3):
            times[k].extend(got[order.index(k)])
        del runners, sessions
    result = probe_result(times[0], times[2], times[1])
    if result.slower:
        result.blame = _blame(original, _node_times(original, feeds, threads, profile_runs),
                              _node_times(pruned, feeds, threads, profile_runs))
    return result


def probe_result(original: list[float], copy: list[float], pruned: list[float]) -> ProbeResult:
    """The probe's verdict from the seconds per run of the original, its copy and the pruned model
    (the seam the tests feed): medians in ms, and the A/A band of :func:`.noise.noise_band`."""
    return ProbeResult(float(np.median(original) * 1e3), float(np.median(pruned) * 1e3), len(original),
                       band=noise_band(original, copy, pruned))


def _node_times(model: onnx.ModelProto | bytes, feeds: dict, threads: int, runs: int) -> dict[str, tuple[str, float]]:
    """Median kernel ms per executed node (onnxruntime's names after its graph optimizations)."""
    with tempfile.TemporaryDirectory(prefix="onnx-bnslim-profile-") as tmp:
        sess = session(model, "the model profiled", optimized=True, threads=threads, timing=True,
                       profile=str(Path(tmp) / "profile"))
        for _ in range(max(runs, 1) + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    per: dict[str, list[float]] = {}
    ops: dict[str, str] = {}
    for e in events:
        if e.get("cat") != "Node" or not e.get("name", "").endswith("_kernel_time"):
            continue
        name = e["name"][: -len("_kernel_time")]
        per.setdefault(name, []).append(e["dur"] / 1e3)
        ops[name] = e.get("args", {}).get("op_name", "")
    # the first run allocates: drop it (every node appears once per run)
    return {n: (ops[n], float(np.median(v[1:] if len(v) > 1 else v))) for n, v in per.items()}


def _blame(original: onnx.ModelProto, before: dict[str, tuple[str, float]], after: dict[str, tuple[str, float]],
           grew: float = 1.1, floor_ms: float = 0.005) -> list[Blame]:
    """Per original layer (the runtime's fused and layout nodes summed into it), those whose time
    grew by more than ``grew`` times plus ``floor_ms``, most grown first."""
    sums: dict[str, list] = {}
    for k, times in enumerate((before, after)):
        for name, (op, ms) in times.items():
            layer = _layer_of(original, name)
            entry = sums.setdefault(layer, [op, 0.0, 0.0])
            entry[1 + k] += ms
    found = [Blame(layer, op, t0, t1) for layer, (op, t0, t1) in sums.items() if t1 > grew * t0 + floor_ms]
    return sorted(found, key=lambda b: b.original_ms - b.pruned_ms)


def _layer_of(model: onnx.ModelProto, profiled: str) -> str:
    """The original node behind an onnxruntime node name: the same name, or, for a node the
    runtime renamed after a tensor (``<tensor>_nchwc`` when it fused a Conv with its BN / ReLU),
    the layer that tensor comes from."""
    names = {n.name for n in model.graph.node}
    if profiled in names:
        return profiled
    base = re.sub(r"_token_\d+$", "", profiled)
    if base in ("ReorderInput", "ReorderOutput"):  # the runtime's layout changes, summed
        return f"{base} (layout changes)"
    producer = {o: n for n in model.graph.node for o in n.output}
    tensor = profiled.removesuffix("_nchwc")
    node = producer.get(tensor)
    for _ in range(6):  # back through the activation / BN / Add the runtime fused into the layer
        if node is None or node.op_type in LAYER_OPS:
            break
        node = next((producer[i] for i in node.input if i in producer), None)
    if node is not None and node.op_type in LAYER_OPS:
        return node.name or node.output[0]
    return profiled


def time_pair(original: onnx.ModelProto, pruned: onnx.ModelProto, runtime: str, feeds: dict[str, np.ndarray],
              threads: int | None = None, runs: int = 20, warmup: int = 3) -> tuple[float, float]:
    """Median ms of ``original`` and ``pruned`` on ``runtime``, timed alternately (A B, B A, ...;
    onnxruntime spinning off), as ``--target-latency`` checks the latency it reached."""

    threads = threads or os.cpu_count() or 1
    with as_file(original) as first, as_file(pruned) as second:
        runners = [_RUNNERS[runtime](first, threads), _RUNNERS[runtime](second, threads)]
        times = _alternate(runners, feeds, warmup, runs)
    return float(np.median(times[0]) * 1e3), float(np.median(times[1]) * 1e3)


# ---------------------------------------------------------------------------------------------
# the four-way table: FP32, slim, INT8 alone, slim + INT8 (bench --quantize int8)

FOUR_WAY = ("fp32", "slim", "int8", "slim_int8")  # the models, in the table's order
FOUR_WAY_LABELS = {"fp32": "FP32", "slim": "Slim", "int8": "INT8", "slim_int8": "Slim + INT8"}


@dataclass
class FourWayRow:
    runtime: str
    batch: int
    times: dict[str, Timing]  # FOUR_WAY key -> timing
    ideal: float  # MACs(FP32) / MACs(slim): what the slim column may reach
    # INT8 alone timed against a second session of itself: the A/A band of slim + INT8 / INT8 alone
    band: NoiseBand = ZERO

    @property
    def int8_verdict(self) -> str:
        """Slim + INT8 against INT8 alone, within or beyond the band: faster, same or slower."""
        return self.band.verdict(self.times["slim_int8"].median_ms / self.times["int8"].median_ms)

    def speedup(self, key: str) -> float:
        """Over the FP32 original."""
        return self.times["fp32"].median_ms / self.times[key].median_ms

    @property
    def pruning_gain_in_int8(self) -> float:
        """INT8 alone / slim + INT8: what pruning still buys once quantized (> 1: faster)."""
        return self.times["int8"].median_ms / self.times["slim_int8"].median_ms

    def to_dict(self) -> dict:
        return {"runtime": self.runtime, "batch": self.batch, "ideal": self.ideal,
                "times": {k: asdict(t) for k, t in self.times.items()},
                "speedup": {k: self.speedup(k) for k in self.times}, "pruning_gain_in_int8": self.pruning_gain_in_int8,
                "band": self.band.to_dict(), "verdict": self.int8_verdict}


@dataclass
class FourWayResult:
    models: dict[str, str]  # FOUR_WAY key -> path timed
    threads: int
    runs: int
    rounds: int
    rows: list[FourWayRow] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"models": self.models, "threads": self.threads, "runs": self.runs, "rounds": self.rounds,
                "rows": [r.to_dict() for r in self.rows], "notes": self.notes}

    def table(self, markdown: bool = False) -> str:
        head = ("Runtime", "Batch", *(f"{FOUR_WAY_LABELS[k]} ms" for k in FOUR_WAY), "Slim ideal (MACs)",
                "Slim+INT8 vs INT8")
        body = []
        for r in self.rows:
            cells = [f"{r.times['fp32'].median_ms:.3f}"]
            cells += [f"{r.times[k].median_ms:.3f} ({r.speedup(k):.2f}x)" for k in FOUR_WAY[1:]]
            verdict = {"same": " (noise)", "slower": " (slower)"}.get(r.int8_verdict, "")
            body.append((r.runtime, str(r.batch), *cells, f"{r.ideal:.2f}x", f"{r.pruning_gain_in_int8:.2f}x{verdict}"))
        if markdown:
            lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
            lines += ["| " + " | ".join(row) + " |" for row in body]
            lines += [""] if self.notes else []
        else:
            lines = grid(head, body)
        lines += [f"Note: {n}" for n in self.notes]
        return "\n".join(lines)


def _rotated(files: list[Path], runtimes: tuple[str, ...], batches: tuple[int, ...], feeds: dict, threads: int,
             warmup: int, per_round: int, rounds: int, min_seconds: float, bar: _Progress) -> dict:
    """(runtime, batch) -> per model of ``files``, its seconds per run: one runtime per round (its
    sessions released before the next), the models alternating within a round (A B C D, D C B A,
    ...), the first slot passed on from round to round."""
    n = len(files)
    times = {(rt, b): [[] for _ in files] for rt in runtimes for b in batches}
    for r in range(rounds):
        for runtime in runtimes:
            order = [(r + k) % n for k in range(n)]  # model r % n goes first in round r
            runners = [_RUNNERS[runtime](files[k], threads) for k in order]
            for batch in batches:
                slots = _alternate(runners, feeds[batch], warmup, per_round, min_seconds)
                for slot, k in enumerate(order):
                    times[runtime, batch][k].extend(slots[slot])
            del runners
            gc.collect()
            bar.step(f"round {r + 1}/{rounds} {runtime} batch {', '.join(map(str, batches))}")
    bar.close()
    return times


def benchmark_openvino(paths: dict[str, str | os.PathLike], inputs_of: str | os.PathLike,
                       batches: tuple[int, ...] = (1, 32), threads: int | None = None, runs: int = 30,
                       warmup: int = 5, rounds: int = 4, min_seconds: float = 0.0) -> dict[int, dict[str, Timing]]:
    """Batch -> label -> timing of OpenVINO models (ONNX files or IR ``.xml``, one interface: that
    of the ONNX model ``inputs_of``, whose inputs are made as :func:`benchmark` makes them), timed
    as :func:`benchmark_four_way` times its four; compiled as the bench compiles (FP32 precision)."""
    threads = threads or os.cpu_count() or 1
    model = load_model(inputs_of)
    feeds = {b: _feeds(model, {}, b, str(inputs_of)) for b in batches}
    batches = tuple(b for b in batches if feeds[b] is not None)
    notes: list[str] = []
    runtimes, rounds, per_round = _schedule(("openvino",), runs, warmup, rounds, notes)
    labels = list(paths)
    times = _rotated([Path(paths[k]) for k in labels], runtimes, batches, feeds, threads, warmup, per_round, rounds,
                     min_seconds, _Progress(rounds, False))
    return {b: {k: Timing.of(times["openvino", b][i]) for i, k in enumerate(labels)} for b in batches}


def benchmark_four_way(paths: dict[str, str | os.PathLike], batches: tuple[int, ...] = (1, 32),
                       threads: int | None = None, runs: int = 30, warmup: int = 5,
                       runtimes: tuple[str, ...] = ("onnxruntime",), input_shapes: dict[str, list[int]] | None = None,
                       progress: bool = False, rounds: int = 4, stream: TextIO | None = None,
                       min_seconds: float = 0.0) -> FourWayResult:
    """Time the four models of :data:`FOUR_WAY` as :func:`benchmark` times two: one runtime per
    round (its sessions released before the next), the models alternating within a round
    (A B C D, D C B A, ...), the first slot passed on from round to round, medians over all runs.
    INT8 alone is timed twice, as two sessions: slim + INT8 is called slower than it only beyond
    that A/A band (:mod:`.noise`)."""
    threads = threads or os.cpu_count() or 1
    missing = [k for k in FOUR_WAY if k not in paths]
    if missing:
        raise ValueError(f"benchmark_four_way needs the models {', '.join(missing)}")
    files = [Path(paths[k]) for k in FOUR_WAY]
    models = [load_model(p) for p in files]
    files.append(files[FOUR_WAY.index("int8")])  # INT8 alone again, a session of its own: the A/A band
    for k, model in zip(FOUR_WAY[1:], models[1:]):
        check_same_interface(models[0], model, (str(files[0]), str(paths[k])))
    notes: list[str] = []
    runtimes, rounds, per_round = _schedule(runtimes, runs, warmup, rounds, notes)
    ideal = _mac_ratio(models[:2], input_shapes or {}, str(files[0]))
    feeds = {b: _feeds(models[0], input_shapes or {}, b, str(files[0])) for b in batches}
    for b, f in feeds.items():
        if f is None:
            notes.append(f"batch {b} skipped: the model's batch size is fixed at {static_batch(models[0])}")
    batches = tuple(b for b in batches if feeds[b] is not None)
    del models
    bar = _Progress(rounds * len(runtimes), progress, stream)
    times = _rotated(files, runtimes, batches, feeds, threads, warmup, per_round, rounds, min_seconds, bar)
    result = FourWayResult({k: str(paths[k]) for k in FOUR_WAY}, threads, per_round * rounds, rounds, notes=notes)
    for runtime in runtimes:
        for batch in batches:
            got = times[runtime, batch]
            int8, copy, slim_int8 = got[FOUR_WAY.index("int8")], got[len(FOUR_WAY)], got[FOUR_WAY.index("slim_int8")]
            result.rows.append(FourWayRow(runtime, batch, {k: Timing.of(got[i]) for i, k in enumerate(FOUR_WAY)}, ideal,
                                          noise_band(int8, copy, slim_int8)))
    slower = [f"{r.runtime} batch {r.batch} ({r.pruning_gain_in_int8:.2f}x, {r.band.describe()})" for r in result.rows
              if r.int8_verdict == "slower"]
    if slower:
        notes.append(f"slim + INT8 is slower than INT8 alone beyond the noise of timing INT8 alone against itself in "
                     f"{', '.join(slower)}: the pruned widths do not suit the INT8 kernels; prune again with "
                     "--round-to 16 (or 32), or keep the slowed layers (--keep)")
    return result

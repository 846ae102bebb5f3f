"""What a layer's width costs in time, measured on the runtime the model will be deployed with.

Each prunable layer (Conv, ConvTranspose, Gemm with a constant weight) is rebuilt with its real
input shape, kernel, strides, padding and groups at a few input and output widths: a quarter, a
half, three quarters and all of each side, on multiples of the machine's channel block, and one
width just off the block on each side. All widths of a layer sit side by side in one model, timed
in onnxruntime or OpenVINO at the batch size and thread count given; the runtime's own profiler
(onnxruntime's profiling, OpenVINO's performance counters) gives each width's kernel time, without
the layout changes at the model's edges that a layer inside a network does not pay, and the
fastest of a few runs is kept. :class:`LatencyCurve` interpolates linearly between the widths
measured and applies the measured penalty of a width off the block.

Layers with the same shape are timed once. Results are cached in
``$XDG_CACHE_HOME/onnx-bnslim/latency.json`` (``~/.cache`` by default), keyed by the machine
(CPU, its flags, core count, runtime and its version), the threads, the batch, the block and the
layer's shape: a pruned model, a re-export or another model with the same layers reuses them, and
nothing stale is used after the runtime or the machine changes.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import math
import os
import platform
import re
import tempfile
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
from onnx import TensorProto, helper

from ..errors import BnSlimError
from ..hardware import channel_block
from ..ir import openvino_ir
from ..ir.model_io import write_text
from ..ir.ops import constant_names
from ..ir.runtime import session
from ..ir.weights import CONV_OPS, LAYER_OPS, axes_of

log = logging.getLogger(__name__)

CACHE_VERSION = 1
# the profilers report whole microseconds; widths of a layer that time alike within a few of them
# cannot be told apart (LatencyCurve.resolved)
RESOLUTION_MS = 0.003
FRACTIONS = (0.25, 0.5, 0.75, 1.0)
TIMED_OPS = LAYER_OPS - {"MatMul"}  # a MatMul reads [batch, ..., K]: no one-node model of it is timed yet
_OPSET = 13


@dataclass
class LatencyCurve:
    """Milliseconds of one layer as a function of its input and output widths.

    ``ms[i][j]`` was measured at ``c_in[i]`` input and ``c_out[j]`` output channels. For a
    depthwise conv (input and output width tied) ``c_in`` is ``[0]`` and ``ms`` one row over
    ``c_out``. ``off_block_in`` / ``off_block_out`` are the measured time ratios of a width one
    below a block multiple to that multiple (1.0 when not measured).
    """

    c_in: list[int]
    c_out: list[int]
    ms: list[list[float]]
    block: int = 1
    off_block_in: float = 1.0
    off_block_out: float = 1.0

    @property
    def tied(self) -> bool:
        return self.c_in == [0]

    @property
    def full_ms(self) -> float:
        return self.ms[-1][-1]

    @property
    def resolved(self) -> bool:
        """Whether the table can tell this layer's widths apart: more than one width was measured
        and the narrowest runs at least :data:`RESOLUTION_MS` faster than the full width. A layer
        no wider than the block (one width measured) or one whose widths all time alike within the
        timer's resolution tells nothing about what pruning it saves."""
        widths = len(self.c_out) * (1 if self.tied else len(self.c_in))
        return widths > 1 and self.full_ms - min(min(row) for row in self.ms) >= RESOLUTION_MS

    def cost(self, c_in: int, c_out: int) -> float:
        """Predicted ms at these widths: bilinear between measured widths, flat below the smallest
        and above the largest, times the off-block penalty for a width that was not measured and is
        not a multiple of the block. A layer below the timer's resolution (not :attr:`resolved`)
        is costed as its full time times its kept fraction of MACs (the fraction of input times
        output channels; of its channels when depthwise): MACs are the proxy where the timer is blind."""
        if not self.resolved:
            fraction = c_out / max(self.c_out)
            if not self.tied:
                fraction *= c_in / max(self.c_in)
            return float(self.full_ms * fraction)
        if self.tied:
            value = _interp(self.c_out, self.ms[0], c_out)
        else:
            i, wi = _bracket(self.c_in, c_in)
            upper = _interp(self.c_out, self.ms[i], c_out)
            lower = _interp(self.c_out, self.ms[max(i - 1, 0)], c_out)
            value = wi * upper + (1 - wi) * lower
        if self._off_block(c_out, self.c_out):
            value *= self.off_block_out
        if not self.tied and self._off_block(c_in, self.c_in):
            value *= self.off_block_in
        return float(value)

    def _off_block(self, width: int, measured: list[int]) -> bool:
        return self.block > 1 and width % self.block != 0 and width not in measured

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict) -> LatencyCurve:
        return cls(**{k: data[k] for k in ("c_in", "c_out", "ms", "block", "off_block_in", "off_block_out")})


def _bracket(xs: list[int], x: float) -> tuple[int, float]:
    """Index i of the first measured width >= x (clamped to 1..len-1) and x's weight on it."""
    if len(xs) == 1:
        return 0, 1.0
    i = min(max(bisect.bisect_left(xs, x), 1), len(xs) - 1)
    lo, hi = xs[i - 1], xs[i]
    return i, float(min(max((x - lo) / (hi - lo), 0.0), 1.0))


def _interp(xs: list[int], ys: list[float], x: float) -> float:
    return float(np.interp(x, xs, ys))


@dataclass
class LayerShape:
    """Everything one layer's time depends on (and nothing that does not)."""

    op: str
    x_shape: list[int]  # input activation with the batch size in place
    c_in: int
    c_out: int
    kernel: list[int]
    group: int
    attrs: dict = field(default_factory=dict)  # the op's attributes other than group
    bias: bool = False

    @property
    def depthwise(self) -> bool:
        return self.op in CONV_OPS and self.group > 1 and self.group == self.c_in and self.c_in == self.c_out

    def key(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)


# ---------------------------------------------------------------------------------------------
# finding the layers


def layer_shapes(model: onnx.ModelProto, shapes: dict[str, list], batch: int,
                 layers: Sequence[str | tuple[str, int, int]] | None = None) -> dict[str, LayerShape]:
    """The shape of every prunable layer (or of the ``layers`` named), keyed by node name.

    A layer is found by its node name or, for nodes without a unique name, by its first output's
    name (the keys returned use the same spelling). A ``(name, c_in, c_out)`` entry must agree
    with the model's weight.
    """
    wanted = None if layers is None else {(x if isinstance(x, str) else x[0]): x for x in layers}
    counts: dict[str, int] = {}
    for node in model.graph.node:
        counts[node.name] = counts.get(node.name, 0) + 1
    consts = constant_names(model)
    found: dict[str, LayerShape] = {}
    for node in model.graph.node:
        if node.op_type not in TIMED_OPS or len(node.input) < 2 or node.input[1] not in consts:
            continue
        key = node.name if node.name and counts[node.name] == 1 else node.output[0]
        if wanted is not None and key not in wanted and node.output[0] not in wanted:
            continue
        shape = _layer_shape(node, shapes, batch)
        if shape is None:
            continue
        if wanted is not None:
            key = key if key in wanted else node.output[0]
            spec = wanted[key]
            if not isinstance(spec, str) and (spec[1], spec[2]) != (shape.c_in, shape.c_out):
                raise BnSlimError(f"layer {key}: the model's weight has {shape.c_in} -> {shape.c_out} channels, "
                                  f"not {spec[1]} -> {spec[2]}; pass the original model's widths")
        found[key] = shape
    if wanted is not None:
        missing = sorted(set(wanted) - set(found))
        if missing:
            raise BnSlimError(f"no Conv/ConvTranspose/Gemm layer with a constant weight and known input shape "
                              f"is named {missing[0]!r}; pass node names (or first output names) of such layers")
    return found


def _layer_shape(node: onnx.NodeProto, shapes: dict[str, list], batch: int) -> LayerShape | None:
    x, w = shapes.get(node.input[0]), shapes.get(node.input[1])
    if not x or not w or not all(isinstance(d, int) and d > 0 for d in [*x[1:], *w]):
        return None
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    attrs = {k: (v.decode() if isinstance(v, bytes) else v) for k, v in attrs.items()}
    bias = len(node.input) > 2 and bool(node.input[2])
    x = [batch, *x[1:]]
    found = axes_of(node.op_type, attrs)
    c_in, c_out = found.in_channels(w), found.out_channels(w)
    if not found.spatial:
        if len(x) != 2 or found.transposed_input:
            return None
        return LayerShape(node.op_type, x, c_in, c_out, [], 1, {"transB": int(attrs.get("transB", 0))}, bias)
    group = int(attrs.pop("group", 1))
    attrs.pop("kernel_shape", None)
    return LayerShape(node.op_type, x, c_in, c_out, list(w[2:]), group, attrs, bias)


# ---------------------------------------------------------------------------------------------
# one-node models at a given width


def _widths(full: int, step: int) -> list[int]:
    """Measured widths: fractions of ``full`` on multiples of ``step``, and ``full`` itself."""
    if full <= step:
        return [full]
    found = {full}
    for f in FRACTIONS:
        w = int(round(full * f / step)) * step
        found.add(min(max(w, step), full))
    return sorted(found)


def _branch(shape: LayerShape, k: int, c_in: int, c_out: int, rng: np.random.Generator):
    """Node, weights and input / output of the layer at one width, its tensors suffixed ``k``."""
    attrs = dict(shape.attrs)
    if shape.op in CONV_OPS:
        attrs["group"] = c_in if shape.depthwise else shape.group
        attrs["kernel_shape"] = shape.kernel
    w_shape = axes_of(shape.op, attrs).shape(c_in, c_out, shape.kernel)
    inits = [onnx.numpy_helper.from_array((rng.standard_normal(w_shape) * 0.05).astype(np.float32), f"w{k}")]
    inputs = [f"x{k}", f"w{k}"]
    if shape.bias:
        inits.append(onnx.numpy_helper.from_array(np.zeros(c_out, np.float32), f"b{k}"))
        inputs.append(f"b{k}")
    node = helper.make_node(shape.op, inputs, [f"y{k}"], name=f"layer{k}", **attrs)
    x = helper.make_tensor_value_info(f"x{k}", TensorProto.FLOAT, [shape.x_shape[0], c_in, *shape.x_shape[2:]])
    return node, inits, x, helper.make_tensor_value_info(f"y{k}", TensorProto.FLOAT, None)


def _layer_model(shape: LayerShape, c_in: int, c_out: int, seed: int = 0) -> onnx.ModelProto:
    """The layer alone at one width (input ``x0``, output ``y0``)."""
    return _widths_model(shape, [(c_in, c_out)], seed)


def _widths_model(shape: LayerShape, points: list[tuple[int, int]], seed: int = 0) -> onnx.ModelProto:
    """One model holding the layer once per width, side by side: branch ``k`` reads ``x{k}``,
    runs node ``layer{k}`` and writes ``y{k}``."""
    rng = np.random.default_rng(seed)
    parts = [_branch(shape, k, ci, co, rng) for k, (ci, co) in enumerate(points)]
    graph = helper.make_graph([p[0] for p in parts], "layer", [p[2] for p in parts], [p[3] for p in parts],
                              [t for p in parts for t in p[1]])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", _OPSET)], ir_version=8)
    inferred = {o.name: o for o in onnx.shape_inference.infer_shapes(model).graph.output}
    for out in model.graph.output:
        out.CopyFrom(inferred[out.name])
    return model


def _feeds_for(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(1)
    return {i.name: rng.standard_normal([d.dim_value for d in i.type.tensor_type.shape.dim]).astype(np.float32)
            for i in model.graph.input}


_BRANCH = re.compile(r"^(?:layer|y)(\d+)(?:_nchwc)?$")


def _ort_branch_ms(model: onnx.ModelProto, threads: int, runs: int) -> dict[int, float]:
    """Fastest kernel time of each branch over ``runs`` profiled runs (after one untimed)."""

    feeds = _feeds_for(model)
    with tempfile.TemporaryDirectory(prefix="onnx-bnslim-latency-") as tmp:
        sess = session(model, "a layer timed alone", optimized=True, threads=threads, timing=True,
                       profile=str(Path(tmp) / "profile"))
        for _ in range(runs + 1):
            sess.run(None, feeds)
        events = json.loads(Path(sess.end_profiling()).read_text())
    seen: dict[int, list[float]] = {}
    for e in events:
        name = e.get("name", "")
        if e.get("cat") != "Node" or not name.endswith("_kernel_time"):
            continue
        match = _BRANCH.match(name[: -len("_kernel_time")])
        if match:
            seen.setdefault(int(match.group(1)), []).append(e["dur"] / 1e3)
    return {k: min(v[1:] or v) for k, v in seen.items()}  # the first run allocates


def _ov_branch_ms(model: onnx.ModelProto, threads: int, runs: int) -> dict[int, float]:
    """Fastest time of each branch's nodes (layout reorders excluded) from OpenVINO's counters."""
    ov = openvino_ir._openvino()
    config = {"INFERENCE_PRECISION_HINT": "f32", "PERF_COUNT": True, "INFERENCE_NUM_THREADS": int(threads)}
    with tempfile.TemporaryDirectory(prefix="onnx-bnslim-latency-") as tmp:
        path = Path(tmp) / "layer.onnx"
        onnx.save_model(model, str(path))
        compiled = ov.Core().compile_model(str(path), "CPU", config)
    request = compiled.create_infer_request()
    feeds = _feeds_for(model)
    request.infer(feeds)
    best: dict[int, float] = {}
    for _ in range(runs):
        request.infer(feeds)
        this: dict[int, float] = {}
        for info in request.get_profiling_info():
            match = _BRANCH.match(info.node_name)
            if match and info.node_type not in ("Reorder", "Parameter", "Result"):
                k = int(match.group(1))
                this[k] = this.get(k, 0.0) + info.real_time.total_seconds() * 1e3
        for k, ms in this.items():
            best[k] = min(best.get(k, ms), ms)
    return best


_TIMERS = {"onnxruntime": _ort_branch_ms, "openvino": _ov_branch_ms}
SESSION_BYTES = 256 * 2**20  # activations of the branches timed together in one session


def _time_points(shape: LayerShape, points: list[tuple[int, int]], runtime: str, threads: int,
                 runs: int = 5, rounds: int = 2) -> dict[tuple[int, int], float]:
    """Kernel ms of the layer at each (c_in, c_out), the widths timed side by side in as few
    sessions as the memory budget allows; the fastest over ``rounds`` sessions of ``runs`` runs
    (a busy neighbour can slow every run of one session)."""
    spatial = int(np.prod(shape.x_shape[2:])) if len(shape.x_shape) > 2 else 1
    grow = max(shape.attrs.get("strides", [1]) or [1]) ** 2 if axes_of(shape.op, shape.attrs).scatters else 1
    chunks: list[list[tuple[int, int]]] = [[]]
    used = 0
    for ci, co in points:
        size = 4 * shape.x_shape[0] * spatial * (ci + co * grow)
        if chunks[-1] and used + size > SESSION_BYTES:
            chunks.append([])
            used = 0
        chunks[-1].append((ci, co))
        used += size
    found: dict[tuple[int, int], float] = {}
    for chunk in chunks:
        model = _widths_model(shape, chunk)
        for _ in range(rounds):
            got = _TIMERS[runtime](model, threads, runs)
            for k, point in enumerate(chunk):
                if k not in got:
                    raise BnSlimError(f"{runtime}'s profile names no node of width {point} of a {shape.op}; "
                                      "this is a bug in onnx-bnslim, please report it")
                found[point] = min(found.get(point, got[k]), got[k])
    return found


def measure_curve(shape: LayerShape, runtime: str, threads: int, block: int) -> LatencyCurve:
    """Time one layer on its grid of widths and one width off the block on each side."""
    step = _step(block, shape.group)
    if shape.depthwise:
        outs = _widths(shape.c_out, block)
        points = [(c, c) for c in outs]
        mid = _off_width(outs, block)
        extra = [(mid - 1, mid - 1)] if mid else []
        times = _time_points(shape, points + extra, runtime, threads)
        row = [times[p] for p in points]
        for _, j in _dominated([row]):  # slower than a wider point: noise, most likely; time it again
            row[j] = min(row[j], _time_points(shape, [points[j]], runtime, threads)[points[j]])
        row = _monotone([row])[0]
        curve = LatencyCurve([0], outs, [row], block)
        if mid:
            curve.off_block_out = times[extra[0]] / row[outs.index(mid)]
        return curve
    ins, outs = _widths(shape.c_in, step), _widths(shape.c_out, step)
    points = [(ci, co) for ci in ins for co in outs]
    extra: dict[str, tuple[int, int]] = {}
    if shape.group == 1:  # widths off the block: one below the middle measured width, on each side
        mid = _off_width(outs, block)
        if mid:
            extra["out"] = (ins[-1], mid - 1)
        mid = _off_width(ins, block)
        if mid and shape.op in CONV_OPS:
            extra["in"] = (mid - 1, outs[-1])
    times = _time_points(shape, points + list(extra.values()), runtime, threads)
    grid = [[times[ci, co] for co in outs] for ci in ins]
    again = _dominated(grid)
    if again:
        retimed = _time_points(shape, [(ins[i], outs[j]) for i, j in again], runtime, threads)
        for i, j in again:
            grid[i][j] = min(grid[i][j], retimed[ins[i], outs[j]])
    grid = _monotone(grid)
    curve = LatencyCurve(ins, outs, grid, block)
    if "out" in extra:
        ci, co = extra["out"]
        curve.off_block_out = times[ci, co] / grid[-1][outs.index(co + 1)]
    if "in" in extra:
        ci, co = extra["in"]
        curve.off_block_in = times[ci, co] / grid[ins.index(ci + 1)][-1]
    return curve


def _dominated(grid: list[list[float]], slack: float = 1.1) -> list[tuple[int, int]]:
    """Points more than ``slack`` times slower than some point at least as wide on both sides."""
    rows, cols = len(grid), len(grid[0])
    return [(i, j) for i in range(rows) for j in range(cols)
            if any(grid[i][j] > slack * grid[a][b] for a in range(i, rows) for b in range(j, cols) if (a, b) != (i, j))]


def _monotone(grid: list[list[float]]) -> list[list[float]]:
    """Each point capped by every point at least as wide on both sides: fewer channels never cost
    more (on block multiples), so what is left of such a gap is noise."""
    out = [row[:] for row in grid]
    for i in reversed(range(len(out))):
        for j in reversed(range(len(out[0]))):
            if i + 1 < len(out):
                out[i][j] = min(out[i][j], out[i + 1][j])
            if j + 1 < len(out[0]):
                out[i][j] = min(out[i][j], out[i][j + 1])
    return out


def _step(block: int, group: int) -> int:
    return block * group // math.gcd(block, group)


def _off_width(widths: list[int], block: int) -> int | None:
    """A measured width on the block with room for one less (the middle one), if any."""
    on = [w for w in widths if w % block == 0 and w > block]
    return on[len(on) // 2] if on and block > 1 else None


# ---------------------------------------------------------------------------------------------
# the cache


def cache_path() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "onnx-bnslim" / "latency.json"


def machine_id(runtime: str) -> str:
    """CPU model, its feature flags, core count and the runtime's version, as one string."""
    cpu, flags = platform.processor() or platform.machine(), ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            key = key.strip().lower()
            if key == "model name" and cpu == (platform.processor() or platform.machine()):
                cpu = value.strip()
            if key in ("flags", "features") and not flags:
                flags = hashlib.sha256(value.strip().encode()).hexdigest()[:12]
    except OSError:
        pass
    if runtime == "onnxruntime":
        import onnxruntime as rt
    else:
        rt = openvino_ir._openvino()
    return f"{cpu}|{flags}|{os.cpu_count()}|{runtime} {rt.__version__}"


def _load_cache(path: Path) -> dict[str, dict]:
    """The cache's entries; a file that is not a cache of this version (unreadable, ``[]``, another
    shape) or entries that are not curves are ignored with a warning, re-measured and rewritten:
    a cache only saves time, so a bad one never stops a run."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("latency cache %s is unreadable (%s): ignored, the layers are timed again", path, exc)
        return {}
    if not isinstance(data, dict) or not isinstance(data.get("entries"), dict):
        log.warning("latency cache %s is not a cache file (a JSON object with 'version' and 'entries'): ignored, "
                    "the layers are timed again and the file rewritten", path)
        return {}
    if data.get("version") != CACHE_VERSION:
        return {}
    entries = {k: v for k, v in data["entries"].items() if _curve_or_none(v) is not None}
    if len(entries) < len(data["entries"]):
        log.warning("latency cache %s: %d entries are not latency curves: ignored, those layers are timed again",
                    path, len(data["entries"]) - len(entries))
    return entries


def _curve_or_none(entry) -> LatencyCurve | None:
    """The curve an entry holds, or None when it is not one (wrong type, missing or ragged fields)."""
    try:
        curve = LatencyCurve.from_dict(entry)
        rows = [[float(v) for v in row] for row in curve.ms]
        ok = (curve.c_in and curve.c_out and all(isinstance(w, int) for w in [*curve.c_in, *curve.c_out])
              and len(rows) == len(curve.c_in) and all(len(r) == len(curve.c_out) for r in rows)
              and all(math.isfinite(v) and v >= 0 for r in rows for v in r)
              and isinstance(curve.block, int) and curve.block >= 1)
        return curve if ok else None
    except (TypeError, KeyError, ValueError, AttributeError):
        return None


def _save_cache(path: Path, new: dict[str, dict]) -> None:
    """Merge ``new`` into what is on disk now (another process may have written) and replace it."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        entries = _load_cache(path)
        entries.update(new)
        write_text(path, json.dumps({"version": CACHE_VERSION, "entries": entries}) + "\n")
    except (OSError, BnSlimError) as exc:  # a cache that cannot be written only costs time
        log.warning("latency cache %s not written: %s", path, exc)


def _entry_key(machine: str, threads: int, block: int, shape: LayerShape) -> str:
    text = json.dumps([CACHE_VERSION, machine, threads, block, FRACTIONS, shape.key()])
    return hashlib.sha256(text.encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# the table


@dataclass
class TableStats:
    layers: int = 0
    shapes: int = 0  # distinct layer shapes
    timed: int = 0  # of those, measured now (the rest came from the cache)
    seconds: float = 0.0


def layer_latency_table(model: onnx.ModelProto, shapes: dict[str, list],
                        layers: Sequence[str | tuple[str, int, int]] | None = None,
                        runtime: str = "onnxruntime", batch: int = 1, threads: int | None = None,
                        cache: bool | str | os.PathLike = True, block: int | None = None,
                        stats: TableStats | None = None) -> dict[str, LatencyCurve]:
    """Per-layer latency curves of ``model`` on ``runtime`` at ``batch`` and ``threads``.

    ``shapes`` are the model's tensor shapes with the inputs fixed
    (:func:`onnxslim_bn.ir.shapes.infer_shapes`); only the batch dimension is replaced. ``layers``
    are node names (optionally with their full ``(c_in, c_out)`` as a check); every Conv,
    ConvTranspose and Gemm with a constant weight when None. ``cache``: True for the default file,
    a path for another, False for none. ``block`` is the channel block (detected when None).
    """
    if runtime not in _TIMERS:
        raise BnSlimError(f"unknown runtime '{runtime}'; choose from {', '.join(_TIMERS)}")
    if batch < 1:
        raise BnSlimError(f"batch {batch} must be at least 1")
    clock = time.perf_counter()
    threads = threads or os.cpu_count() or 1
    block = block or channel_block()[0]
    found = layer_shapes(model, shapes, batch, layers)
    path = None if cache is False else (cache_path() if cache is True else Path(cache))
    stored = _load_cache(path) if path else {}
    machine = machine_id(runtime)
    keys = {name: _entry_key(machine, threads, block, s) for name, s in found.items()}
    curves: dict[str, LatencyCurve] = {}
    new: dict[str, dict] = {}
    for name, shape in found.items():
        key = keys[name]
        if key in stored:
            curves[name] = LatencyCurve.from_dict(stored[key])
            continue
        if key not in new:
            log.info("timing %s %s %s -> %s on %s", name, shape.op, shape.c_in, shape.c_out, runtime)
            new[key] = measure_curve(shape, runtime, threads, block).to_dict()
        curves[name] = LatencyCurve.from_dict(new[key])
    if path and new:
        _save_cache(path, new)
    if stats is not None:
        stats.layers, stats.shapes, stats.timed = len(found), len(set(keys.values())), len(new)
        stats.seconds = time.perf_counter() - clock
    return curves


def resolution_note(curves: dict[str, LatencyCurve]) -> str | None:
    """One line naming the layers below the timer's resolution (costed by MACs), or None."""
    blind = [name for name, c in curves.items() if not c.resolved]
    if not blind:
        return None
    names = ", ".join(blind[:4]) + (f" and {len(blind) - 4} more" if len(blind) > 4 else "")
    share = sum(curves[n].full_ms for n in blind) / max(sum(c.full_ms for c in curves.values()), 1e-12)
    head = ("the latency table cannot see a gain in any layer" if len(blind) == len(curves) else
            f"{len(blind)} of {len(curves)} layers in the latency table are below the timer's resolution")
    return (f"{head} ({names}: their widths time alike within {RESOLUTION_MS * 1e3:.0f} us, or only one width fits "
            f"the block); their time ({share:.0%} of the table's) is costed in proportion to their MACs")


def predicted_ms(curves: dict[str, LatencyCurve], widths: dict[str, tuple[int, int]] | None = None) -> float:
    """Sum of the layers' predicted times at ``widths`` (name -> (c_in, c_out); full widths for
    layers not listed)."""
    widths = widths or {}
    total = 0.0
    for name, curve in curves.items():
        if name in widths:
            total += curve.cost(*widths[name])
        else:
            total += curve.full_ms
    return total


__all__ = ["LatencyCurve", "LayerShape", "TableStats", "layer_latency_table", "layer_shapes", "measure_curve",
           "predicted_ms", "resolution_note", "cache_path"]

"""Compensation by reconstruction: refit every layer whose input channels were pruned so that
its output matches the original's on calibration data.

For each such consumer (Conv, Gemm, MatMul with a constant weight), in topological order:

- targets: the *original* model's output of that layer (the conv output, bias included) at
  sampled positions of the calibration samples;
- inputs: the *pruned* model's own input to that layer, computed with every earlier layer
  already refit, so that errors do not compound;
- per output channel, ridge-regularised least squares with a bias column, in closed form from
  the Gram matrix (:class:`calibrate.Gram`). The ridge pulls toward the data-free solution
  (the sliced weights with the bias folding already applied), scaled by the Gram's trace, so
  when that solution is exact -- removed channels that were constant, unpadded layers -- the
  refit returns it unchanged.

The pruned model is run once, layer level by layer level: the nodes that depend on refit
layers of level L run after those layers are refit, from the stored activations of the level
before (kept per chunk of samples), so every node runs once. The original runs once, keeping
only its layer outputs at the sampled positions. What is stored between levels is held in memory
up to ``STORE_BYTES`` and goes to files in a temporary folder past that (:class:`_Store`), so the
memory of a refit does not grow with the number of samples (the Gram matrices are reducers).

The refit is an edit of the weights the plan already owns: a refit layer's weight and bias are
rewritten in place under their own names (an initializer that is also a graph input stays
overridable); a layer protected with ``--keep`` (``frozen``), a weight read by another node or
inside a subgraph, and a weight stored behind a ``Cast`` are left as bias folding made them.
Where the removed channels meet a padded consumer, the surgery's border map (the constant
channels' exact correction at the borders) is a fixed part of the fit: the layer is refit with
it in place, and the map is kept when it makes the fit more exact (always, when the removed
channels were constant) and the model stays no larger than the input, else dropped. A kept map
that a BatchNormalization reads goes behind it, scaled by it, so that the layer and its BN fuse.

Nodes are matched between the two models by their output tensor name (pruning keeps it; a
constant ``Add`` that bias folding put behind a MatMul is recognised). Which original output
channels a pruned layer kept is read from the weights: the pruned weight is an exact slice of
the original's.
"""

from __future__ import annotations

import copy
import logging
import os
import tempfile
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from ..ir import runtime
from ..ir.model_io import weight_bytes
from ..ir.ops import BIAS_ADD, DEQUANTIZE, IDENTITY, constant_tensor, storage_casts
from ..ir.weights import LAYER_OPS, axes
from ..rules.roles import NORMALIZATION
from .calibrate import Gram, Patches, _ids, sample_positions
from .verify import static_batch

log = logging.getLogger(__name__)

CONSUMER_OPS = LAYER_OPS - {"ConvTranspose"}  # a transposed conv scatters: its rows are no im2col patches
# a layer refit only because its input changed (``downstream``) needs this many sampled rows per
# unknown of its least-squares problem; below that, it stays as it is
MIN_ROWS_PER_UNKNOWN = 4
# rows a layer's fit samples: MIN_ROWS_PER_UNKNOWN per unknown, at least this many, at most
# ``max_rows``. The Gram matrix costs rows x unknowns²: on the fixtures 4,096 rows fit as well as
# 16,384 (agreement within noise), and on a ResNet-50 the wide 3x3 layers get the rows they need
ROWS_FLOOR = 4096
CHUNK_BYTES = 256 * 2**20  # the original's layer outputs held at once (see _collect_targets)
STORE_BYTES = 256 * 2**20  # activations and targets kept in memory between levels; the rest go to files
# a border map stays behind a refit layer when the fit with it leaves at most this share of the
# squared residual of the fit without it (constant removed channels: ~0)
MAP_GAIN = 0.5


@dataclass
class LayerFit:
    node: str
    op: str
    output: str
    input_channels: tuple[int, int]  # (pruned, original)
    downstream: bool  # refit because its input changed, not because it lost input channels
    error_before: float  # relative: ||pruned - original|| / ||original - its mean|| at the sampled rows
    error_after: float
    rows: int  # sampled rows (positions) the fit used
    seconds: float


@dataclass
class ReconstructionReport:
    samples: int
    layers: list[LayerFit] = field(default_factory=list)
    skipped: list[tuple[str, str]] = field(default_factory=list)  # (node, reason)
    levels: int = 0
    seconds: float = 0.0  # in all; of which:
    seconds_original: float = 0.0  # running the original for the targets
    seconds_pruned: float = 0.0  # running the pruned model level by level (the refits: LayerFit.seconds)
    spilled_bytes: int = 0  # activations and targets the store wrote to files (past STORE_BYTES)
    maps_kept: int = 0  # border maps kept behind refit layers
    maps_dropped: int = 0  # border maps a refit layer did better without (or that did not fit the size)
    maps_too_large: int = 0  # of those, maps that would have been more exact but make the model larger than the input

    def summary(self) -> str:
        if not self.layers:
            return f"reconstruction: no layer refit ({len(self.skipped)} skipped)"
        before = np.mean([f.error_before for f in self.layers])
        after = np.mean([f.error_after for f in self.layers])
        maps = "" if not (self.maps_kept or self.maps_dropped) else \
            f", {self.maps_kept} border maps kept and {self.maps_dropped} dropped"
        return (f"reconstruction: {len(self.layers)} layers refit on {self.samples} calibration samples "
                f"(mean relative error {before:.3g} -> {after:.3g}), {len(self.skipped)} skipped{maps}, "
                f"{self.seconds:.1f} s")


@dataclass
class _Layer:
    index: int
    node: onnx.NodeProto  # in the working copy of the pruned model
    target: str  # the original model's output tensor of this layer
    trailing_add: onnx.NodeProto | None  # a constant Add behind it in the pruned model (MatMul bias)
    kept_outputs: np.ndarray  # original output channels the pruned layer kept, in order
    input_channels: tuple[int, int]
    weight_shape: tuple[int, ...]
    downstream: bool = False  # refit because its input changed, not because it lost input channels
    border: onnx.NodeProto | None = None  # the surgery's border-map Add behind it (a fixed [1, C, H, W] offset)
    gram: Gram | None = None
    plain: Gram | None = None  # with a border map: the same rows against the targets without the map
    level: int = 0
    refit: bool = False  # done (a downstream layer with too few rows is left as it was)
    slot: bool = False  # its bias Add was made by the refit (_add_bias_slots)
    map_kept: bool | None = None  # with a border map: the refit's decision


class _Constants:
    """Constant tensors of a model by name: initializers, Constant nodes, and Identity of those."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.init = {t.name: t for t in model.graph.initializer}
        self.nodes: dict[str, onnx.TensorProto] = {}
        self.alias: dict[str, str] = {}
        for node in model.graph.node:
            tensor = constant_tensor(node)
            if tensor is not None:
                self.nodes[node.output[0]] = tensor
            elif node.op_type == IDENTITY and node.input[0] in self:
                self.alias[node.output[0]] = node.input[0]

    def _resolve(self, name: str) -> str:
        while name in self.alias:
            name = self.alias[name]
        return name

    def __contains__(self, name: str) -> bool:
        name = self._resolve(name)
        return name in self.init or name in self.nodes

    def get(self, name: str) -> np.ndarray | None:
        name = self._resolve(name)
        proto = self.init[name] if name in self.init else self.nodes.get(name)
        return None if proto is None else numpy_helper.to_array(proto)


def _as_rows(node: onnx.NodeProto, weight: np.ndarray) -> tuple[np.ndarray, int]:
    """The weight as [outputs, inputs per group, taps] and the group count."""
    found = axes(node)
    rows = weight if found.out_axis == 0 else np.swapaxes(weight, 0, 1)
    return rows.reshape(rows.shape[0], rows.shape[1], -1), found.groups


def _subsequence(row: np.ndarray, sub: np.ndarray) -> np.ndarray | None:
    """Indices i_0 < i_1 < ... with row[i_j] == sub[j] (leftmost), or None."""
    equal = (row[:, None, :] == sub[None, :, :]).all(-1)
    picks, j = [], 0
    for i in range(len(row)):
        if j < len(sub) and equal[i, j]:
            picks.append(i)
            j += 1
    return np.array(picks) if j == len(sub) else None


def _match_rows(rows: np.ndarray, sub: np.ndarray) -> np.ndarray | None:
    """Increasing indices of ``rows`` equal to each row of ``sub`` in turn, or None."""
    out, r = [], 0
    for target in sub:
        while r < len(rows) and not np.array_equal(rows[r], target):
            r += 1
        if r == len(rows):
            return None
        out.append(r)
        r += 1
    return np.array(out, np.int64)


def _match_block(orig: np.ndarray, pruned: np.ndarray) -> np.ndarray | None:
    if orig.shape[1] == pruned.shape[1]:
        return _match_rows(orig, pruned)
    if len(pruned) == 0:
        return np.zeros(0, np.int64)
    for r in range(len(orig) - len(pruned) + 1):
        cols = _subsequence(orig[r], pruned[0])
        if cols is not None:
            found = _match_rows(orig[:, cols], pruned)
            if found is not None:
                return found
    return None


def kept_outputs(orig: np.ndarray, orig_groups: int, pruned: np.ndarray, pruned_groups: int) -> np.ndarray | None:
    """Which original output channels a pruned layer kept, read from the weights (as
    [outputs, inputs per group, taps]): the pruned weight is an exact slice of the original."""
    if orig_groups == pruned_groups:
        g = orig_groups
        o, p = len(orig) // g, len(pruned) // g
        parts = []
        for j in range(g):
            found = _match_block(orig[j * o:(j + 1) * o], pruned[j * p:(j + 1) * p])
            if found is None:
                return None
            parts.append(j * o + found)
        return np.concatenate(parts) if parts else np.zeros(0, np.int64)
    if orig.shape[1] == pruned.shape[1]:  # depthwise: groups follow the channels
        return _match_rows(orig, pruned)
    return None


def _graphs(node: onnx.NodeProto) -> list[onnx.GraphProto]:
    out = []
    for a in node.attribute:
        if a.type == onnx.AttributeProto.GRAPH:
            out.append(a.g)
        elif a.type == onnx.AttributeProto.GRAPHS:
            out.extend(a.graphs)
    return out


def _outer_reads(graph: onnx.GraphProto) -> set[str]:
    """Names a subgraph (and the subgraphs inside it) reads from the enclosing scopes."""
    local = {v.name for v in graph.input} | {t.name for t in graph.initializer}
    reads: set[str] = set()
    for node in graph.node:
        reads.update(n for n in node.input if n)
        for sub in _graphs(node):
            reads |= _outer_reads(sub)
        local.update(node.output)
    return reads - local


def reads(node: onnx.NodeProto) -> list[str]:
    """Every tensor a node reads: its inputs, and the outer-scope tensors its If / Loop / Scan
    bodies read implicitly."""
    names = [n for n in node.input if n]
    for sub in _graphs(node):
        names.extend(sorted(_outer_reads(sub) - set(names)))
    return names


def _dequantized(model: onnx.ModelProto, constants: _Constants) -> dict[str, np.ndarray]:
    """The integers behind each ``DequantizeLinear`` of a constant (a QDQ model's weights), by its output."""
    return {n.output[0]: constants.get(n.input[0]) for n in model.graph.node
            if n.op_type == DEQUANTIZE and n.input[0] in constants}


def find_layers(original: onnx.ModelProto, pruned: onnx.ModelProto, consumers: list[str] | None = None,
                downstream: bool = False, frozen: frozenset[str] | set[str] = frozenset(),
                leftover: list[tuple[onnx.NodeProto, onnx.NodeProto]] | None = None,
                ) -> tuple[list[_Layer], list[tuple[str, str]]]:
    """The pruned model's layers whose input channels were pruned, matched to the original;
    with ``downstream``, also every later layer whose input the cut changed (values differ from
    the original only downstream of a layer that lost input channels). Layers named in
    ``frozen`` (``--keep``) are never refit; ``leftover`` collects the (layer, border-map Add)
    pairs of the layers left as they are."""
    changed: set[str] = set()
    orig_const, pruned_const = _Constants(original), _Constants(pruned)
    orig_by_out = {o: n for n in original.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in pruned.graph.node:
        for name in reads(node):
            readers.setdefault(name, []).append(node)
    casts, orig_casts = storage_casts(pruned, pruned_const), storage_casts(original, orig_const)
    integers, orig_integers = _dequantized(pruned, pruned_const), _dequantized(original, orig_const)
    layers, skipped = [], []
    for node in pruned.graph.node:
        if changed.intersection(reads(node)):
            changed.update(node.output)
        if node.op_type in CONSUMER_OPS and len(node.input) > 1 and node.input[1] in integers:
            before = orig_integers.get((orig_by_out.get(node.output[0]) or node).input[1])
            if before is not None and \
                    axes(node).in_channels(before.shape) != axes(node).in_channels(integers[node.input[1]].shape):
                skipped.append((node.name or node.output[0], "its weight is INT8 behind a DequantizeLinear (a QDQ "
                                                             "model): a refit would compute new float weights"))
            continue
        if node.op_type not in CONSUMER_OPS or len(node.input) < 2 or \
                (node.input[1] not in pruned_const and node.input[1] not in casts):
            continue
        target, trailing, border = node.output[0], None, None
        if orig_by_out.get(target) is None or orig_by_out[target].op_type != node.op_type:
            after = readers.get(target, [])
            if (len(after) == 1 and after[0].op_type == BIAS_ADD and after[0].input[0] == target
                    and after[0].input[1] in pruned_const and orig_by_out.get(after[0].output[0]) is not None
                    and orig_by_out[after[0].output[0]].op_type == node.op_type):
                trailing, target = after[0], after[0].output[0]
            else:
                continue
        orig_node = orig_by_out[target]
        label = node.name or target
        if node.input[1] in casts:
            w = pruned_const.get(casts[node.input[1]].input[0])
        else:
            w = pruned_const.get(node.input[1])
        if trailing is not None:
            extra = pruned_const.get(trailing.input[1])
            if extra.size != len(_as_rows(node, w)[0]):  # not a bias: the surgery's border map
                if not axes(node).spatial or extra.ndim != 4 or extra.shape[:2] != (1, len(_as_rows(node, w)[0])):
                    skipped.append((label, "a constant tensor that is neither a bias nor a border map is added behind it"))
                    continue
                trailing, border = None, trailing
        name = orig_node.input[1]
        w_orig = orig_const.get(orig_casts[name].input[0] if name in orig_casts else name)
        if (consumers is not None and label not in consumers and target not in consumers) or w_orig is None:
            if border is not None and leftover is not None:  # not refit: its map is settled by size
                leftover.append((node, border))
            continue
        channels = (axes(node).in_channels(w.shape), axes(orig_node).in_channels(w_orig.shape))
        if channels[0] == channels[1] and not (downstream and node.input[0] in changed):
            continue
        changed.update(node.output)
        reason = None
        found = axes(node)
        others = [r for name in node.input[1:3] if name for r in readers.get(name, []) if r is not node]
        if label in frozen or node.name in frozen:
            reason = "protected with --keep"
        elif node.input[1] in casts or any(name in casts for name in node.input[2:3]):
            reason = f"its weight is stored as {w.dtype} behind a Cast (refitting it would change its storage)"
        elif others:
            inside = [r for r in others if node.input[1] not in r.input and (len(node.input) < 3 or node.input[2] not in r.input)]
            reason = (f"its weight is also read by {others[0].op_type} {others[0].name or others[0].output[0]}"
                      + (" inside a subgraph" if inside else "") + ": refitting it in place would change that reader too")
        elif found.transposed_input:
            reason = f"{node.op_type} with transA"
        elif found.bias is not None and len(node.input) > found.bias and node.input[found.bias] and \
                node.input[found.bias] not in pruned_const:
            reason = f"{node.op_type} with a computed bias"
        elif any(name in pruned_const.alias for name in node.input[1:]):
            reason = "its weight or bias is read through an Identity"
        elif not np.issubdtype(w.dtype, np.floating):
            reason = f"weight of type {w.dtype}"
        if reason is None:
            (ro, go), (rp, gp) = _as_rows(orig_node, w_orig), _as_rows(node, w)
            kept = kept_outputs(ro, go, rp, gp)
            if kept is None:
                reason = "its weight is not a slice of the original's (cannot match the channels)"
        if reason is not None:
            skipped.append((label, reason))
            if border is not None and leftover is not None:
                leftover.append((node, border))
            continue
        layers.append(_Layer(len(layers), node, target, trailing, kept, channels, tuple(w.shape),
                             downstream=channels[0] == channels[1], border=border))
    return layers, skipped


# --------------------------------------------------------------------------- running the models
def _submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: dict[str, np.dtype],
              outputs: list[str], constants: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    used = {n for node in nodes for n in reads(node)}
    graph = onnx.helper.make_graph(
        nodes, "segment",
        [onnx.helper.make_tensor_value_info(n, onnx.helper.np_dtype_to_tensor_dtype(d), None)
         for n, d in inputs.items()],
        [onnx.helper.make_empty_tensor_value_info(n) for n in outputs],
        [constants[n] for n in used if n in constants])
    sub = onnx.helper.make_model(graph, opset_imports=model.opset_import, ir_version=model.ir_version)
    sub.functions.extend(model.functions)
    return sub


def _levels(nodes: list[onnx.NodeProto], layers: list[_Layer]) -> list[int]:
    """Segment of every node: the highest refit level it depends on (its own, for a refit layer)."""
    of_node = {id(layer.node): layer for layer in layers}
    level: dict[str, int] = {}
    out = []
    for node in nodes:
        here = max((level.get(n, 0) for n in reads(node)), default=0)
        layer = of_node.get(id(node))
        if layer is not None:
            layer.level = here + 1
            here = layer.level
        for name in node.output:
            level[name] = here
        out.append(here)
    return out


def _needed(nodes: list[onnx.NodeProto], wanted: set[str]) -> set[int]:
    """Positions of the nodes that the ``wanted`` tensors depend on."""
    need, keep = set(wanted), set()
    for i in range(len(nodes) - 1, -1, -1):
        if need.intersection(nodes[i].output):
            keep.add(i)
            need.update(reads(nodes[i]))
    return keep


class _Store:
    """Per-chunk arrays kept between levels (activations, targets): in memory up to ``budget``
    bytes, in ``.npy`` files of a temporary folder past that, read back when used and deleted
    when dropped. The calibration feeds themselves are read from the caller's arrays."""

    def __init__(self, feeds: dict[str, np.ndarray], budget: int | None = None) -> None:
        self.feeds, self.budget = feeds, STORE_BYTES if budget is None else budget
        self.memory: dict[tuple, np.ndarray] = {}
        self.files: dict[tuple, str] = {}
        self.held = 0
        self.spilled = 0  # bytes written to files in all
        self.folder: tempfile.TemporaryDirectory | None = None
        self.ranges: list[tuple[int, int]] = []

    def names(self) -> set[str]:
        return {key[0] for key in (*self.memory, *self.files)}

    def __contains__(self, name: str) -> bool:
        return name in self.feeds or name in self.names()

    def put(self, name: str, index: int, value: np.ndarray) -> None:
        key = (name, index)
        if self.held + value.nbytes <= self.budget:
            self.memory[key] = value
            self.held += value.nbytes
            return
        if self.folder is None:
            self.folder = tempfile.TemporaryDirectory(prefix="bnslim-refit-")
        path = os.path.join(self.folder.name, f"{len(self.files)}-{self.spilled}.npy")
        np.save(path, np.ascontiguousarray(value))
        self.files[key] = path
        self.spilled += value.nbytes

    def get(self, name: str, index: int) -> np.ndarray:
        if name in self.feeds:  # a rank-0 input is fed whole to every chunk
            start, stop = self.ranges[index]
            value = self.feeds[name]
            return value[start:stop] if np.ndim(value) else value
        key = (name, index)
        return self.memory[key] if key in self.memory else np.load(self.files[key])

    def dtype(self, name: str) -> np.dtype:
        return self.get(name, 0).dtype

    def drop(self, name: str) -> None:
        for key in [k for k in self.memory if k[0] == name]:
            self.held -= self.memory.pop(key).nbytes
        for key in [k for k in self.files if k[0] == name]:
            os.remove(self.files.pop(key))

    def close(self) -> None:
        self.memory.clear()
        self.files.clear()
        if self.folder is not None:
            self.folder.cleanup()
            self.folder = None


def _current(layer: _Layer, const: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The layer's present weights and bias as [groups, d + 1, outputs per group]."""
    node = layer.node
    w = numpy_helper.to_array(const[node.input[1]]).astype(np.float64)
    found = axes(node)
    rows, groups = _as_rows(node, w)
    bias = np.zeros(len(rows))
    rows = rows * found.scale  # Gemm's alpha (1 for the other layers)
    if found.bias is not None and len(node.input) > found.bias and node.input[found.bias]:
        b = numpy_helper.to_array(const[node.input[found.bias]]).astype(np.float64)
        bias = bias + np.broadcast_to(b.reshape(-1), bias.shape) * found.bias_scale
    if layer.trailing_add is not None:
        bias = bias + numpy_helper.to_array(const[layer.trailing_add.input[1]]).astype(np.float64).reshape(-1)
    per = len(rows) // groups
    flat = rows.reshape(len(rows), -1)
    return np.stack([np.concatenate([flat[j * per:(j + 1) * per].T, bias[None, j * per:(j + 1) * per]])
                     for j in range(groups)])


def _solve(gram: Gram, ridge: float) -> np.ndarray:
    """The correction to the current weights: ridge least squares on the residual, the ridge
    scaled by the mean diagonal of each group's Gram matrix. The bias is not regularised: a
    constant residual (removed channels that were constant) goes to the bias whole."""
    groups, width, _ = gram.ata.shape
    d = width - 1
    diagonal = np.einsum("gii->gi", gram.ata)[:, :d]
    lam = ridge * diagonal.mean(1) + 1e-12  # per group
    regularised = gram.ata.copy()
    regularised[:, np.arange(d), np.arange(d)] += lam[:, None]
    if d > 512:  # wide layers: LU in float32 (twice as fast; the ridge keeps the system well conditioned)
        return np.linalg.solve(regularised.astype(np.float32), gram.atr.astype(np.float32)).astype(np.float64)
    return np.linalg.solve(regularised, gram.atr)


def _unique(name: str, taken: set[str]) -> str:
    out, i = name, 0
    while out in taken:
        i += 1
        out = f"{name}_{i}"
    taken.add(out)
    return out


def _set_constant(model: onnx.ModelProto, const: dict[str, onnx.TensorProto], name: str, values: np.ndarray) -> None:
    """New values for constant ``name`` under the same name: an initializer in place (an
    initializer-input stays overridable), or a ``Constant`` node's value."""
    tensor = numpy_helper.from_array(values, name)
    for init in model.graph.initializer:
        if init.name == name:
            init.CopyFrom(tensor)
            break
    else:
        for node in model.graph.node:
            held = constant_tensor(node)
            if held is not None and list(node.output) == [name]:
                held.CopyFrom(tensor)
                break
        else:
            model.graph.initializer.append(tensor)
    const[name] = tensor


def _write(layer: _Layer, w: np.ndarray, model: onnx.ModelProto, const: dict[str, onnx.TensorProto],
           taken: set[str]) -> None:
    """Put the fitted [groups, d + 1, outputs per group] into the working model: the weight and
    the bias keep their names and storage types (a layer without a bias gets one)."""
    node = layer.node
    dtype = numpy_helper.to_array(const[node.input[1]]).dtype
    groups, d1, per = w.shape
    weight = np.concatenate([w[j, :-1, :].T for j in range(groups)])  # [outputs, d]
    bias = np.concatenate([w[j, -1, :] for j in range(groups)])

    def put(index: int, values: np.ndarray, base: str) -> None:
        while len(node.input) <= index:
            node.input.append("")
        if not node.input[index]:
            node.input[index] = _unique(f"{base}_bias", taken)
            shape, kind = values.shape, dtype
        else:
            old = numpy_helper.to_array(const[node.input[index]])
            shape, kind = old.shape, old.dtype
        _set_constant(model, const, node.input[index], values.reshape(shape).astype(kind))

    def set_attr(key: str, value: float) -> None:
        for a in node.attribute:
            if a.name == key:
                node.attribute.remove(a)
                break
        node.attribute.append(onnx.helper.make_attribute(key, value))

    label, found = node.name or layer.target, axes(node)
    put(1, (weight if found.out_axis == 0 else weight.T).reshape(layer.weight_shape), label)
    if found.bias is not None:
        put(found.bias, bias, label)
    for key in found.scale_attrs:  # the fit holds them
        set_attr(key, 1.0)
    if layer.trailing_add is not None:  # MatMul: its bias Add; Conv/Gemm: zero now (removed at the end)
        values = bias if found.bias is None else np.zeros_like(bias)
        old = numpy_helper.to_array(const[layer.trailing_add.input[1]])
        _set_constant(model, const, layer.trailing_add.input[1], values.reshape(old.shape).astype(old.dtype))


def _add_bias_slots(model: onnx.ModelProto, layers: list[_Layer], taken: set[str]) -> None:
    """Give every MatMul layer without one a bias ``Add`` (zero until refit). Done before the
    model runs: the graph's structure stays fixed while the layers are refit."""
    for layer in layers:
        if axes(layer.node).bias is not None or layer.trailing_add is not None:
            continue
        node = layer.node
        weight = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type) if weight is not None else np.float32
        zeros = numpy_helper.from_array(np.zeros(len(layer.kept_outputs), dtype),
                                        _unique(f"{node.name or node.output[0]}_bias", taken))
        model.graph.initializer.append(zeros)
        pre = _unique(f"{node.output[0]}_refit_in", taken)
        add = onnx.helper.make_node(BIAS_ADD, [pre, zeros.name], [node.output[0]],
                                    name=_unique(f"{node.name or node.output[0]}_refit_bias", taken))
        node.output[0] = pre
        position = next(i for i, n in enumerate(model.graph.node) if n is node)
        model.graph.node.insert(position + 1, add)
        layer.trailing_add = model.graph.node[position + 1]
        layer.slot = True


def _remove_after(model: onnx.ModelProto, layer: _Layer, add: onnx.NodeProto) -> None:
    layer.node.output[0] = add.output[0]
    model.graph.node.remove(add)


def _bypass(model: onnx.ModelProto, node: onnx.NodeProto, add: onnx.NodeProto) -> None:
    """Remove ``add`` (node's output + a constant): its readers read the node's output, whose
    name stays (the report measures the pruned graph by these names); a graph output keeps its
    name, the node then writes it."""
    if add.output[0] in {o.name for o in model.graph.output}:
        node.output[0] = add.output[0]
        model.graph.node.remove(add)
        return
    old, new = add.output[0], add.input[0]
    model.graph.node.remove(add)

    def rename(graph: onnx.GraphProto) -> None:
        for reader in graph.node:
            reader.input[:] = [new if n == old else n for n in reader.input]
            for sub in _graphs(reader):
                rename(sub)

    rename(model.graph)


def _fold_bias_adds(model: onnx.ModelProto, layers: list[_Layer]) -> None:
    """After the refits: the bias Adds behind refit Conv/Gemm layers (zero now) go, and so do the
    bias slots of MatMul layers left as they were, and the border maps the refit dropped."""
    for layer in layers:
        add = layer.trailing_add
        if add is not None and ((axes(layer.node).bias is not None and layer.refit) or (layer.slot and not layer.refit)):
            _remove_after(model, layer, add)
            layer.trailing_add = None
        if layer.border is not None and layer.map_kept is False:
            _bypass(model, layer.node, layer.border)
            layer.border = None


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {n for node in model.graph.node for n in reads(node)}
    inputs = {i.name for i in model.graph.input}
    keep = [t for t in model.graph.initializer if t.name in used or t.name in inputs]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# -------------------------------------------------------------------------------------- the stage
def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray],
                consumers: list[str] | None = None, ridge: float = 1e-3, max_positions: int = 64,
                seed: int = 0, downstream: bool = True, max_rows: int = 16384,
                frozen: frozenset[str] | set[str] = frozenset(),
                keep_maps: bool = False) -> tuple[onnx.ModelProto, ReconstructionReport]:
    """Refit the layers of ``pruned`` whose input channels were pruned (or those named in
    ``consumers``, by node name or output tensor) on the calibration ``feeds``; with
    ``downstream``, also the later layers whose input the cut changed (when the samples give
    enough rows: ``MIN_ROWS_PER_UNKNOWN``). Layers named in ``frozen`` stay as they are.

    ``ridge`` scales the regularisation relative to the Gram matrix's mean diagonal;
    ``max_positions`` caps the spatial positions sampled per sample and layer, and ``max_rows``
    the rows of one layer's fit (over all samples; each layer takes ``MIN_ROWS_PER_UNKNOWN`` per
    unknown, at least ``ROWS_FLOOR``): the Gram matrix costs rows x width², and a 3x3 conv over
    256 channels is 2,305 wide. Border maps behind refit layers stay when ``keep_maps``
    (``--exact-borders``), else when they make the fit more exact (``MAP_GAIN``) and the model's
    weights stay within the original's. Neither input model is modified; the returned model is
    a refit copy of ``pruned``."""
    clock = time.perf_counter()
    model = copy.deepcopy(pruned)
    leftover: list[tuple[onnx.NodeProto, onnx.NodeProto]] = []
    layers, skipped = find_layers(original, model, consumers, downstream, frozen, leftover)
    report = ReconstructionReport(samples=runtime.count(feeds), skipped=skipped)
    batch = static_batch(original)
    if layers and batch and report.samples < batch:
        report.skipped.extend((layer.node.name or layer.target, f"{report.samples} calibration samples do not fill "
                               f"one batch of the model's fixed batch size {batch}") for layer in layers)
        layers = []
    for label, reason in report.skipped:
        log.info("reconstruction skips %s: %s", label, reason)
    if not layers:
        kept = _settle_leftover_maps(model, leftover, None if keep_maps else weight_bytes(original), report)
        _maps_behind_batchnorm(model, kept)
        report.seconds = time.perf_counter() - clock
        return model, report
    for layer in layers:
        # a Conv's SAME padding needs the input size: its patches are set again at the refit
        patches = Patches.for_conv(layer.node, layer.weight_shape, None) if axes(layer.node).spatial else Patches()
        rows = min(max_rows, max(ROWS_FLOOR, MIN_ROWS_PER_UNKNOWN * _unknowns(layer)))
        per_sample = max(1, min(max_positions, rows // max(report.samples, 1)))
        layer.gram = Gram(patches, per_sample, seed, layer.index)
        if layer.border is not None:
            layer.plain = Gram(patches, per_sample, seed, layer.index)
    store = _Store(feeds)
    try:
        step = time.perf_counter()
        size = _collect_targets(original, feeds, layers, batch, store)
        report.seconds_original = time.perf_counter() - step
        maps = sum(_map_bytes(layer, model) for layer in layers if layer.border is not None)
        room = None if keep_maps else weight_bytes(original) - (weight_bytes(model) - maps)
        _refit_in_order(model, layers, batch, size, ridge, report, store, room)
        report.spilled_bytes = store.spilled
    finally:
        store.close()
    _fold_bias_adds(model, layers)
    report.maps_kept = sum(1 for layer in layers if layer.map_kept)
    report.maps_dropped = sum(1 for layer in layers if layer.map_kept is False)
    kept = _settle_leftover_maps(model, leftover, None if keep_maps else weight_bytes(original), report)
    _maps_behind_batchnorm(model, [layer.border for layer in layers if layer.map_kept] + kept)
    report.seconds = time.perf_counter() - clock
    log.info(report.summary())
    return model, report


def _unknowns(layer: _Layer) -> int:
    """Columns of the layer's least-squares problem per group: its weight's inputs, and a bias."""
    out_axis = axes(layer.node).out_axis
    return int(np.prod([d for a, d in enumerate(layer.weight_shape) if a != out_axis])) + 1




def _settle_leftover_maps(model: onnx.ModelProto, leftover: list[tuple[onnx.NodeProto, onnx.NodeProto]],
                          limit: int | None, report: ReconstructionReport) -> list[onnx.NodeProto]:
    """The border maps behind layers the refit left: kept while the weights stay within
    ``limit`` bytes (None: all kept), else removed (the layer is then exact inside and
    approximate at the borders, as bias folding left it). Returns the maps kept."""
    _drop_unused(model)
    sizes = {t.name: int(np.prod(t.dims)) * onnx.helper.tensor_dtype_to_np_dtype(t.data_type).itemsize
             for t in model.graph.initializer}
    total = weight_bytes(model)
    kept = []
    for node, add in leftover:
        if limit is None or total <= limit:
            report.maps_kept += 1
            kept.append(add)
            continue
        _bypass(model, node, add)
        total -= sizes.get(add.input[1], 0)
        report.maps_dropped += 1
        report.maps_too_large += 1
    _drop_unused(model)
    return kept


def _maps_behind_batchnorm(model: onnx.ModelProto, maps: list[onnx.NodeProto]) -> None:
    """Each border map (``layer -> Add(map) -> BatchNormalization``) whose only reader is a BN
    with constant statistics goes behind that BN, scaled by gamma / sqrt(var + eps): the same
    values, and the layer and its BN fuse again. Between them the map costs an unfused BN in
    onnxruntime's FP32 and, in INT8 (quant_pre_process folds BNs into convs), a dequantize, BN,
    quantize round trip per layer: slim + INT8 of the consistent ResNet-50 (13 maps) took 38 ms
    at batch 8 instead of 31 (onnxruntime, 2 threads, load 0.9)."""
    const = _Constants(model)
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in model.graph.node:
        for name in reads(node):
            readers.setdefault(name, []).append(node)
    outputs = {o.name for o in model.graph.output}
    taken = {n for node in model.graph.node for n in (*node.input, *node.output)} | {t.name for t in model.graph.initializer}
    for add in maps:
        after = readers.get(add.output[0], [])
        if len(after) != 1 or after[0].op_type not in NORMALIZATION or add.output[0] in outputs:
            continue
        bn = after[0]
        stats = [const.get(name) for name in bn.input[1:5]]
        values = const.get(add.input[1])
        if len(bn.output) != 1 or bn.input[0] != add.output[0] or values is None or any(s is None for s in stats):
            continue
        gamma, _, _, var = (s.astype(np.float64) for s in stats)
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        scaled = values.astype(np.float64) * (gamma / np.sqrt(var + eps))[None, :, None, None]
        _set_constant(model, const.init, add.input[1], scaled.astype(values.dtype))
        # names: the layer keeps its output (the report measures the surgery's graph by it), the
        # map writes the BN's, the BN's output in between is new
        middle = f"{bn.output[0]}_border_in"
        while middle in taken:
            middle += "_"
        taken.add(middle)
        bn.input[0], bn.output[0], add.input[0], add.output[0] = add.input[0], middle, middle, bn.output[0]
        first = onnx.NodeProto()  # the BN now runs before the map: the two nodes swap places
        first.CopyFrom(bn)
        bn.CopyFrom(add)
        add.CopyFrom(first)


def _map_bytes(layer: _Layer, model: onnx.ModelProto) -> int:
    name = layer.border.input[1]
    tensor = next((t for t in model.graph.initializer if t.name == name), None)
    return 0 if tensor is None else int(numpy_helper.to_array(tensor).nbytes)


def _collect_targets(original: onnx.ModelProto, feeds: dict[str, np.ndarray], layers: list[_Layer],
                     batch: int | None, store: _Store) -> int:
    """One run of the original: each layer's output at its sampled positions, kept channels
    only, into ``store`` (as ``("target", layer index)``).

    Returns the chunk size for both models (the same chunks keep the sampled positions the same):
    the fixed batch, else as many samples as keep every layer output of one chunk within
    ``CHUNK_BYTES`` (all of a ResNet-50's conv outputs are ~100 MB per 224x224 sample)."""
    targets = [layer.target for layer in layers]
    sess = runtime.session(original, "the original model (reconstruction)", optimized=True, extra_outputs=targets)
    size = batch
    if size is None:
        probe = sess.run(targets, {k: v[:1] if np.ndim(v) else v for k, v in feeds.items()})
        size = int(max(1, min(32, CHUNK_BYTES // max(1, sum(v.nbytes for v in probe)))))
        del probe
    for index, (samples, values) in enumerate(runtime.stream(sess, feeds, targets, batch, size)):
        store.ranges.append((int(samples[0]), int(samples[-1]) + 1))
        for layer, y in zip(layers, values):
            rows = layer.gram.target_rows(y, samples)[..., layer.kept_outputs].astype(np.float32)
            store.put(f"target {layer.index}", index, rows)
        del values
    return size


def _refit_in_order(model: onnx.ModelProto, layers: list[_Layer], batch: int | None, size: int, ridge: float,
                    report: ReconstructionReport, store: _Store, room: int | None) -> None:
    """Run the pruned model level by level, every node once: the layers of level L are refit
    from the stored activations, then the nodes that depend on them run (with the new weights)
    and store, chunk by chunk, what later levels read. A stored tensor goes once read for the
    last time. ``room``: bytes the border maps may add (None: no limit)."""
    taken = {t.name for t in model.graph.initializer}
    taken |= {n for node in model.graph.node for n in (*node.input, *node.output, node.name)}
    _add_bias_slots(model, layers, taken)
    const = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes travel with every segment that reads them
        held = constant_tensor(node)
        if held is not None:
            const[node.output[0]] = numpy_helper.from_array(numpy_helper.to_array(held), node.output[0])
    # one list of the node objects, held throughout: protobuf hands out a new wrapper per access
    # when none is alive, so identity (and id()) holds only while this list does
    every = list(model.graph.node)
    wanted = _needed(every, {layer.node.input[0] for layer in layers}) | {
        next(i for i, n in enumerate(every) if n is layer.node) for layer in layers}
    nodes = [n for i, n in enumerate(every) if i in wanted and n.output[0] not in const]
    segment = _levels(nodes, layers)
    report.levels = max(layer.level for layer in layers)
    last_read: dict[str, int] = {}
    for node, level in zip(nodes, segment):
        for name in reads(node):
            last_read[name] = max(last_read.get(name, -1), level)
    produced_in = {o: level for node, level in zip(nodes, segment) for o in node.output}
    count = len(store.ranges)
    state = {"room": room}
    for level in range(report.levels + 1):
        for layer in (layer for layer in layers if layer.level == level):
            _refit(layer, store, count, model, const, taken, ridge, report, state)
        here = [n for n, s in zip(nodes, segment) if s == level]
        outputs = [o for o in dict.fromkeys(o for n in here for o in n.output) if o and last_read.get(o, -1) > level]
        if outputs:
            step = time.perf_counter()
            made = {o for n in here for o in n.output}
            inputs = {n: store.dtype(n) for node in here for n in reads(node)
                      if n not in made and n not in const and n in store}
            sess = runtime.session(_submodel(model, here, inputs, outputs, const), "a segment of the pruned model "
                                   "(reconstruction)", optimized=True)
            for i in range(count):
                for name, value in zip(outputs, sess.run(outputs, {n: store.get(n, i) for n in inputs})):
                    store.put(name, i, value)
            del sess
            report.seconds_pruned += time.perf_counter() - step
        for name in [n for n in store.names() if last_read.get(n, -1) <= level and produced_in.get(n, 0) <= level
                     and not n.startswith("target ")]:
            store.drop(name)


def _map_rows(border: np.ndarray, gram: Gram, n: int, samples: np.ndarray) -> np.ndarray:
    """The border map [1, C, *spatial] at the layer's sampled positions of ``n`` samples: [n, P, C]."""
    flat = border.reshape(border.shape[1], -1)
    pos = sample_positions(flat.shape[1], gram.max_positions, gram.seed, gram.layer, _ids(samples, n))
    return flat[:, pos].transpose(1, 2, 0)


def _refit(layer: _Layer, store: _Store, count: int, model: onnx.ModelProto, const: dict[str, onnx.TensorProto],
           taken: set[str], ridge: float, report: ReconstructionReport, state: dict) -> None:
    clock = time.perf_counter()
    node = layer.node
    gram, plain = layer.gram, layer.plain
    border = None if layer.border is None else numpy_helper.to_array(const[layer.border.input[1]]).astype(np.float32)
    w0 = _current(layer, const)
    for i in range(count):
        x = store.get(node.input[0], i)
        if i == 0 and axes(node).spatial:
            gram.patches = Patches.for_conv(node, layer.weight_shape, tuple(x.shape[2:]))
            if plain is not None:
                plain.patches = gram.patches
        start, stop = store.ranges[i]
        samples = np.arange(start, stop)
        y = store.get(f"target {layer.index}", i)
        if border is not None:
            plain.update(x, samples, y, w0)
            y = y - _map_rows(border, gram, x.shape[0], samples)
        gram.update(x, samples, y, w0)
    store.drop(f"target {layer.index}")
    unknowns = gram.ata.shape[1]
    if layer.downstream and gram.rows < MIN_ROWS_PER_UNKNOWN * unknowns:
        report.skipped.append((node.name or layer.target, f"downstream layer with {gram.rows} sampled rows for "
                               f"{unknowns} unknowns per output: too few to refit without overfitting"))
        layer.gram = layer.plain = None
        return
    delta = _solve(gram, ridge)
    scale = gram if plain is None else plain  # errors against the original's output, map or not
    before, after = gram.residual(), gram.residual(delta)
    if plain is not None:
        delta_plain = _solve(plain, ridge)
        after_plain = plain.residual(delta_plain)
        size = border.size * numpy_helper.to_array(const[layer.border.input[1]]).dtype.itemsize
        fits = state["room"] is None or size <= state["room"]
        gains = after < MAP_GAIN * after_plain
        layer.map_kept = state["room"] is None or (fits and gains)
        log.debug("border map behind %s: relative error %.3g with it, %.3g without: %s", node.name,
                  _relative(after, plain.spread()), _relative(after_plain, plain.spread()),
                  "kept" if layer.map_kept else "dropped")
        report.maps_too_large += int(not fits and gains)
        if layer.map_kept:
            if state["room"] is not None:
                state["room"] -= size
        else:  # without the map: the segments after this level run with it zero, it goes at the end
            delta, before, after = delta_plain, plain.residual(), after_plain
            name = layer.border.input[1]
            _set_constant(model, const, name, np.zeros_like(numpy_helper.to_array(const[name])))
    spread = scale.spread()
    fit = LayerFit(node.name or layer.target, node.op_type, layer.target, layer.input_channels, layer.downstream,
                   _relative(before, spread), _relative(after, spread), gram.rows, 0.0)
    _write(layer, w0 + delta, model, const, taken)
    layer.refit = True
    layer.gram = layer.plain = None
    fit.seconds = time.perf_counter() - clock
    report.layers.append(fit)
    log.debug("refit %s: relative error %.4g -> %.4g on %d rows", fit.node, fit.error_before, fit.error_after, fit.rows)


def _relative(residual: float, spread: float) -> float:
    residual = max(residual, 0.0)
    return float(np.sqrt(residual / spread)) if spread > 0 else float(np.sqrt(residual))

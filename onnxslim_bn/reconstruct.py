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
layers of level L run after those layers are refit, from the cached activations of the level
before (kept per chunk of samples), so every node runs once. The original runs once, keeping
only its layer outputs at the sampled positions.

Nodes are matched between the two models by their output tensor name (pruning keeps it; a
constant ``Add`` that bias folding put behind a MatMul is recognised). Which original output
channels a pruned layer kept is read from the weights: the pruned weight is an exact slice of
the original's.
"""

from __future__ import annotations

import copy
import logging
import time
from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import numpy_helper

from .calibrate import Gram, Patches, chunks
from .verify import count as sample_count, static_batch

log = logging.getLogger(__name__)

CONSUMER_OPS = ("Conv", "Gemm", "MatMul")
# a layer refit only because its input changed (``downstream``) needs this many sampled rows per
# unknown of its least-squares problem; below that, it stays as it is
MIN_ROWS_PER_UNKNOWN = 4
# rows a layer's fit samples: MIN_ROWS_PER_UNKNOWN per unknown, at least this many, at most
# ``max_rows``. The Gram matrix costs rows x unknowns²: on the fixtures 4,096 rows fit as well as
# 16,384 (agreement within noise), and on a ResNet-50 the wide 3x3 layers get the rows they need
ROWS_FLOOR = 4096
CHUNK_BYTES = 256 * 2**20  # the original's layer outputs held at once (see _collect_targets)


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

    def summary(self) -> str:
        if not self.layers:
            return f"reconstruction: no layer refit ({len(self.skipped)} skipped)"
        before = np.mean([f.error_before for f in self.layers])
        after = np.mean([f.error_after for f in self.layers])
        return (f"reconstruction: {len(self.layers)} layers refit on {self.samples} calibration samples "
                f"(mean relative error {before:.3g} -> {after:.3g}), {len(self.skipped)} skipped, {self.seconds:.1f} s")


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
    gram: Gram | None = None
    targets: list[np.ndarray] = field(default_factory=list)  # per chunk: [n, P, kept outputs]
    level: int = 0
    refit: bool = False  # done (a downstream layer with too few rows is left as it was)


class _Constants:
    """Constant tensors of a model by name: initializers, Constant nodes, and Identity of those."""

    def __init__(self, model: onnx.ModelProto) -> None:
        self.init = {t.name: t for t in model.graph.initializer}
        self.nodes: dict[str, onnx.TensorProto] = {}
        self.alias: dict[str, str] = {}
        for node in model.graph.node:
            if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
                self.nodes[node.output[0]] = node.attribute[0].t
            elif node.op_type == "Identity" and node.input[0] in self:
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


def _attrs(node: onnx.NodeProto) -> dict:
    return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}


def _as_rows(node: onnx.NodeProto, weight: np.ndarray) -> tuple[np.ndarray, int]:
    """The weight as [outputs, inputs per group, taps] and the group count."""
    if node.op_type == "Conv":
        return weight.reshape(weight.shape[0], weight.shape[1], -1), int(_attrs(node).get("group", 1))
    if node.op_type == "Gemm" and _attrs(node).get("transB", 0):
        return weight[:, :, None], 1
    return weight.T[:, :, None], 1


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


def _input_channels(node: onnx.NodeProto, shape: tuple[int, ...]) -> int:
    if node.op_type == "Conv":
        return shape[1] * int(_attrs(node).get("group", 1))
    if node.op_type == "Gemm" and _attrs(node).get("transB", 0):
        return shape[1]
    return shape[0]


def find_layers(original: onnx.ModelProto, pruned: onnx.ModelProto, consumers: list[str] | None = None,
                downstream: bool = False) -> tuple[list[_Layer], list[tuple[str, str]]]:
    """The pruned model's layers whose input channels were pruned, matched to the original;
    with ``downstream``, also every later layer whose input the cut changed (values differ from
    the original only downstream of a layer that lost input channels)."""
    changed: set[str] = set()
    orig_const, pruned_const = _Constants(original), _Constants(pruned)
    orig_by_out = {o: n for n in original.graph.node for o in n.output}
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in pruned.graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    layers, skipped = [], []
    for node in pruned.graph.node:
        if changed.intersection(node.input):
            changed.update(node.output)
        if node.op_type not in CONSUMER_OPS or len(node.input) < 2 or node.input[1] not in pruned_const:
            continue
        target, trailing = node.output[0], None
        if orig_by_out.get(target) is None or orig_by_out[target].op_type != node.op_type:
            after = readers.get(target, [])
            if (len(after) == 1 and after[0].op_type == "Add" and after[0].input[0] == target
                    and after[0].input[1] in pruned_const and orig_by_out.get(after[0].output[0]) is not None
                    and orig_by_out[after[0].output[0]].op_type == node.op_type):
                trailing, target = after[0], after[0].output[0]
            else:
                continue
        orig_node = orig_by_out[target]
        label = node.name or target
        if consumers is not None and label not in consumers and target not in consumers:
            continue
        w_orig, w = orig_const.get(orig_node.input[1]), pruned_const.get(node.input[1])
        if w_orig is None:
            continue
        channels = (_input_channels(node, w.shape), _input_channels(orig_node, w_orig.shape))
        if channels[0] == channels[1] and not (downstream and node.input[0] in changed):
            continue
        changed.update(node.output)
        reason = None
        attrs = _attrs(node)
        if node.op_type == "Gemm" and attrs.get("transA", 0):
            reason = "Gemm with transA"
        elif node.op_type == "Gemm" and len(node.input) > 2 and node.input[2] and node.input[2] not in pruned_const:
            reason = "Gemm with a computed bias"
        elif node.op_type == "Conv" and len(node.input) > 2 and node.input[2] and node.input[2] not in pruned_const:
            reason = "Conv with a computed bias"
        elif any(name in pruned_const.alias for name in node.input[1:]):
            reason = "its weight or bias is read through an Identity"
        elif not np.issubdtype(w.dtype, np.floating):
            reason = f"weight of type {w.dtype}"
        elif trailing is not None and pruned_const.get(trailing.input[1]).size != len(_as_rows(node, w)[0]):
            reason = "a constant map, not a bias, is added behind it (border correction)"
        if reason is None:
            (ro, go), (rp, gp) = _as_rows(orig_node, w_orig), _as_rows(node, w)
            kept = kept_outputs(ro, go, rp, gp)
            if kept is None:
                reason = "its weight is not a slice of the original's (cannot match the channels)"
        if reason is not None:
            skipped.append((label, reason))
            continue
        layers.append(_Layer(len(layers), node, target, trailing, kept, channels, tuple(w.shape),
                             downstream=channels[0] == channels[1]))
    return layers, skipped


# --------------------------------------------------------------------------- running the models
def _session(model: onnx.ModelProto):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 3
    return ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])


def _with_outputs(model: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of the model (weights shared by value) whose outputs are ``names``."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    del out.graph.output[:]
    out.graph.output.extend(onnx.helper.make_empty_tensor_value_info(n) for n in names)
    return out


def _submodel(model: onnx.ModelProto, nodes: list[onnx.NodeProto], inputs: dict[str, np.dtype],
              outputs: list[str], constants: dict[str, onnx.TensorProto]) -> onnx.ModelProto:
    used = {n for node in nodes for n in node.input}
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
        here = max((level.get(n, 0) for n in node.input if n), default=0)
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
            need.update(n for n in nodes[i].input if n)
    return keep


def _current(layer: _Layer, const: dict[str, onnx.TensorProto]) -> np.ndarray:
    """The layer's present weights and bias as [groups, d + 1, outputs per group]."""
    node = layer.node
    w = numpy_helper.to_array(const[node.input[1]]).astype(np.float64)
    attrs = _attrs(node)
    rows, groups = _as_rows(node, w)
    bias = np.zeros(len(rows))
    if node.op_type == "Gemm":
        rows = rows * attrs.get("alpha", 1.0)
    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2]:
        b = numpy_helper.to_array(const[node.input[2]]).astype(np.float64)
        scale = attrs.get("beta", 1.0) if node.op_type == "Gemm" else 1.0
        bias = bias + np.broadcast_to(b.reshape(-1), bias.shape) * scale
    if layer.trailing_add is not None:
        bias = bias + numpy_helper.to_array(const[layer.trailing_add.input[1]]).astype(np.float64).reshape(-1)
    per = len(rows) // groups
    flat = rows.reshape(len(rows), -1)
    return np.stack([np.concatenate([flat[j * per:(j + 1) * per].T, bias[None, j * per:(j + 1) * per]])
                     for j in range(groups)])


def _error(gram: Gram, delta: np.ndarray | None = None) -> float:
    """Relative error of the layer (after adding ``delta``) against the targets, from the
    reducer's sums alone: residual norm over the targets' spread around their mean."""
    spread = gram.spread()
    sq = max(gram.residual(delta), 0.0)
    return float(np.sqrt(sq / spread)) if spread > 0 else float(np.sqrt(sq))


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


def _write(layer: _Layer, w: np.ndarray, model: onnx.ModelProto, const: dict[str, onnx.TensorProto],
           taken: set[str]) -> None:
    """Put the fitted [groups, d + 1, outputs per group] into the working model."""
    node = layer.node
    dtype = numpy_helper.to_array(const[node.input[1]]).dtype
    groups, d1, per = w.shape
    weight = np.concatenate([w[j, :-1, :].T for j in range(groups)])  # [outputs, d]
    bias = np.concatenate([w[j, -1, :] for j in range(groups)])

    def put(values: np.ndarray, base: str) -> str:
        name = _unique(f"{base}_refit", taken)
        tensor = numpy_helper.from_array(values.astype(dtype), name)
        model.graph.initializer.append(tensor)
        const[name] = tensor
        return name

    def set_input(index: int, name: str) -> None:
        while len(node.input) <= index:
            node.input.append("")
        node.input[index] = name

    def set_attr(key: str, value: float) -> None:
        for a in node.attribute:
            if a.name == key:
                node.attribute.remove(a)
                break
        node.attribute.append(onnx.helper.make_attribute(key, value))

    label = node.name or layer.target
    if node.op_type == "Conv":
        set_input(1, put(weight.reshape(layer.weight_shape), label + "_W"))
        set_input(2, put(bias, label + "_B"))
    elif node.op_type == "Gemm":
        set_input(1, put(weight if _attrs(node).get("transB", 0) else weight.T, label + "_B"))
        set_input(2, put(bias, label + "_C"))
        set_attr("alpha", 1.0)
        set_attr("beta", 1.0)
    else:
        set_input(1, put(weight.T, label + "_W"))
    if layer.trailing_add is not None:  # MatMul: its bias Add; Conv/Gemm: zero now (removed at the end)
        values = bias if node.op_type == "MatMul" else np.zeros_like(bias)
        layer.trailing_add.input[1] = put(values, label + "_bias")


def _add_bias_slots(model: onnx.ModelProto, layers: list[_Layer], taken: set[str]) -> None:
    """Give every MatMul layer without one a bias ``Add`` (zero until refit). Done before the
    model runs: the graph's structure stays fixed while the layers are refit."""
    for layer in layers:
        if layer.node.op_type != "MatMul" or layer.trailing_add is not None:
            continue
        node = layer.node
        weight = next((t for t in model.graph.initializer if t.name == node.input[1]), None)
        dtype = onnx.helper.tensor_dtype_to_np_dtype(weight.data_type) if weight is not None else np.float32
        zeros = numpy_helper.from_array(np.zeros(len(layer.kept_outputs), dtype),
                                        _unique(f"{node.name or node.output[0]}_bias", taken))
        model.graph.initializer.append(zeros)
        pre = _unique(f"{node.output[0]}_refit_in", taken)
        add = onnx.helper.make_node("Add", [pre, zeros.name], [node.output[0]],
                                    name=_unique(f"{node.name or node.output[0]}_refit_bias", taken))
        node.output[0] = pre
        position = next(i for i, n in enumerate(model.graph.node) if n is node)
        model.graph.node.insert(position + 1, add)
        layer.trailing_add = model.graph.node[position + 1]


def _fold_bias_adds(model: onnx.ModelProto, layers: list[_Layer]) -> None:
    """After the refits: the bias Adds behind refit Conv/Gemm layers (zero now) go."""
    for layer in layers:
        add = layer.trailing_add
        if add is None or layer.node.op_type == "MatMul" or not layer.refit:
            continue
        layer.node.output[0] = add.output[0]
        model.graph.node.remove(add)
        layer.trailing_add = None


def _drop_unused(model: onnx.ModelProto) -> None:
    used = {n for node in model.graph.node for n in node.input}
    for graph in (a.g for node in model.graph.node for a in node.attribute if a.type == onnx.AttributeProto.GRAPH):
        used |= {n for node in graph.node for n in node.input}
    keep = [t for t in model.graph.initializer if t.name in used or t.name in {i.name for i in model.graph.input}]
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)


# -------------------------------------------------------------------------------------- the stage
def reconstruct(original: onnx.ModelProto, pruned: onnx.ModelProto, feeds: dict[str, np.ndarray],
                consumers: list[str] | None = None, ridge: float = 1e-3, max_positions: int = 64,
                seed: int = 0, downstream: bool = True,
                max_rows: int = 16384) -> tuple[onnx.ModelProto, ReconstructionReport]:
    """Refit the layers of ``pruned`` whose input channels were pruned (or those named in
    ``consumers``, by node name or output tensor) on the calibration ``feeds``; with
    ``downstream``, also the later layers whose input the cut changed (when the samples give
    enough rows: ``MIN_ROWS_PER_UNKNOWN``).

    ``ridge`` scales the regularisation relative to the Gram matrix's mean diagonal;
    ``max_positions`` caps the spatial positions sampled per sample and layer, and ``max_rows``
    the rows of one layer's fit (over all samples; each layer takes ``MIN_ROWS_PER_UNKNOWN`` per
    unknown, at least ``ROWS_FLOOR``): the Gram matrix costs rows x width², and a 3x3 conv over
    256 channels is 2,305 wide. Neither input
    model is modified; the returned model is a refit copy of ``pruned``."""
    clock = time.perf_counter()
    model = copy.deepcopy(pruned)
    layers, skipped = find_layers(original, model, consumers, downstream)
    report = ReconstructionReport(samples=sample_count(feeds), skipped=skipped)
    for label, reason in skipped:
        log.info("reconstruction skips %s: %s", label, reason)
    if not layers:
        report.seconds = time.perf_counter() - clock
        return model, report
    batch = static_batch(original)
    for layer in layers:
        # a Conv's SAME padding needs the input size: its patches are set again at the refit
        patches = Patches.for_conv(layer.node, layer.weight_shape, None) if layer.node.op_type == "Conv" else Patches()
        rows = min(max_rows, max(ROWS_FLOOR, MIN_ROWS_PER_UNKNOWN * _unknowns(layer)))
        per_sample = max(1, min(max_positions, rows // max(report.samples, 1)))
        layer.gram = Gram(patches, per_sample, seed, layer.index)
    step = time.perf_counter()
    size = _collect_targets(original, feeds, layers, batch)
    report.seconds_original = time.perf_counter() - step
    _refit_in_order(model, feeds, layers, batch, size, ridge, report)
    _fold_bias_adds(model, layers)
    _drop_unused(model)
    report.seconds = time.perf_counter() - clock
    log.info(report.summary())
    return model, report


def _unknowns(layer: _Layer) -> int:
    """Columns of the layer's least-squares problem per group: its weight's inputs, and a bias."""
    shape, op = layer.weight_shape, layer.node.op_type
    if op == "Conv":
        return int(np.prod(shape[1:])) + 1
    if op == "Gemm" and _attrs(layer.node).get("transB", 0):
        return int(shape[1]) + 1
    return int(shape[0]) + 1


def _collect_targets(original: onnx.ModelProto, feeds: dict[str, np.ndarray], layers: list[_Layer],
                     batch: int | None) -> int:
    """One run of the original: each layer's output at its sampled positions, kept channels only.

    Returns the chunk size for both models (the same chunks keep the sampled positions the same):
    the fixed batch, else as many samples as keep every layer output of one chunk within
    ``CHUNK_BYTES`` (all of a ResNet-50's conv outputs are ~100 MB per 224x224 sample)."""
    targets = [layer.target for layer in layers]
    sess = _session(_with_outputs(original, targets))
    size = batch
    if size is None:
        probe = sess.run(targets, {k: v[:1] if np.ndim(v) else v for k, v in feeds.items()})
        size = int(max(1, min(32, CHUNK_BYTES // max(1, sum(v.nbytes for v in probe)))))
        del probe
    for samples, chunk in chunks(feeds, batch, size):
        values = sess.run(targets, chunk)
        for layer, y in zip(layers, values):
            layer.targets.append(layer.gram.target_rows(y, samples)[..., layer.kept_outputs].astype(np.float32))
    return size


def _refit_in_order(model: onnx.ModelProto, feeds: dict[str, np.ndarray], layers: list[_Layer],
                    batch: int | None, size: int, ridge: float, report: ReconstructionReport) -> None:
    """Run the pruned model level by level, every node once: the layers of level L are refit
    from the cached activations, then the nodes that depend on them run (with the new weights)
    and cache, chunk by chunk, what later levels read. A cached tensor goes once read for the
    last time."""
    taken = {t.name for t in model.graph.initializer}
    taken |= {n for node in model.graph.node for n in (*node.input, *node.output, node.name)}
    _add_bias_slots(model, layers, taken)
    const = {t.name: t for t in model.graph.initializer}
    for node in model.graph.node:  # Constant nodes travel with every segment that reads them
        if node.op_type == "Constant" and node.attribute and node.attribute[0].name == "value":
            const[node.output[0]] = numpy_helper.from_array(numpy_helper.to_array(node.attribute[0].t), node.output[0])
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
        for name in node.input:
            last_read[name] = max(last_read.get(name, -1), level)
    produced_in = {o: level for node, level in zip(nodes, segment) for o in node.output}
    cache: dict[str, list[np.ndarray]] = {}
    sample_chunks = []
    for samples, chunk in chunks(feeds, batch, size):
        sample_chunks.append(samples)
        for name, value in chunk.items():
            cache.setdefault(name, []).append(value)
    for level in range(report.levels + 1):
        for layer in (layer for layer in layers if layer.level == level):
            _refit(layer, cache[layer.node.input[0]], sample_chunks, model, const, taken, ridge, report)
        here = [n for n, s in zip(nodes, segment) if s == level]
        outputs = [o for o in dict.fromkeys(o for n in here for o in n.output) if o and last_read.get(o, -1) > level]
        if outputs:
            step = time.perf_counter()
            made = {o for n in here for o in n.output}
            inputs = {n: cache[n][0].dtype for node in here for n in node.input
                      if n and n not in made and n not in const}
            sess = _session(_submodel(model, here, inputs, outputs, const))
            for i in range(len(sample_chunks)):
                for name, value in zip(outputs, sess.run(outputs, {n: cache[n][i] for n in inputs})):
                    cache.setdefault(name, []).append(value)
            report.seconds_pruned += time.perf_counter() - step
        for name in [n for n in cache if last_read.get(n, -1) <= level and produced_in.get(n, 0) <= level]:
            del cache[name]


def _refit(layer: _Layer, inputs: list[np.ndarray], sample_chunks: list[np.ndarray], model: onnx.ModelProto,
           const: dict[str, onnx.TensorProto], taken: set[str], ridge: float, report: ReconstructionReport) -> None:
    clock = time.perf_counter()
    node = layer.node
    gram = layer.gram
    if node.op_type == "Conv":
        gram.patches = Patches.for_conv(node, layer.weight_shape, tuple(inputs[0].shape[2:]))
    w0 = _current(layer, const)
    for x, samples, y in zip(inputs, sample_chunks, layer.targets):
        gram.update(x, samples, y, w0)
    layer.targets = []
    unknowns = gram.ata.shape[1]
    if layer.downstream and gram.rows < MIN_ROWS_PER_UNKNOWN * unknowns:
        report.skipped.append((node.name or layer.target, f"downstream layer with {gram.rows} sampled rows for "
                               f"{unknowns} unknowns per output: too few to refit without overfitting"))
        layer.gram = None
        return
    delta = _solve(gram, ridge)
    fit = LayerFit(node.name or layer.target, node.op_type, layer.target, layer.input_channels, layer.downstream,
                   _error(gram), _error(gram, delta), gram.rows, 0.0)
    w = w0 + delta
    _write(layer, w, model, const, taken)
    layer.refit = True
    layer.gram = None
    fit.seconds = time.perf_counter() - clock
    report.layers.append(fit)
    log.debug("refit %s: relative error %.4g -> %.4g on %d rows", fit.node, fit.error_before, fit.error_after, fit.rows)

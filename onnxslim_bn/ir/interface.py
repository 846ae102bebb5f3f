"""The model's interface and size, kept through pruning.

Node names are made unique on import (ONNX allows them to be empty or repeated, and the
analysis keys by them); after export, the pruned model gets back what onnx-graphsurgeon drops
(initializers listed as graph inputs, node and graph metadata) and is held to the input's
interface (inputs and outputs by name, order, element type and rank) and to its weight size.
"""

from __future__ import annotations

import contextlib
import logging
from dataclasses import dataclass, field

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import helper, numpy_helper

from ..errors import BnSlimError
from .model_io import graphs, too_large_for_protobuf
from .ops import constant_tensor

log = logging.getLogger(__name__)

GROWTH_LIMIT = 1.1  # refuse (without allow_growth) a pruned model whose weights exceed the input's by more


def unique_node_names(names: list[str], ops: list[str]) -> list[str]:
    """The names with every empty one and every repeat after the first use replaced by a
    unique ``<op>_<k>`` / ``<name>_<k>`` (same input, same output: deterministic)."""
    taken = {n for n in names if n}
    seen: set[str] = set()
    counters: dict[str, int] = {}
    out = []
    for name, op in zip(names, ops):
        if name and name not in seen:
            seen.add(name)
            out.append(name)
            continue
        base = name or op
        k = counters.get(base, 1)
        while f"{base}_{k}" in taken:
            k += 1
        counters[base] = k + 1
        taken.add(f"{base}_{k}")
        seen.add(f"{base}_{k}")
        out.append(f"{base}_{k}")
    return out


@dataclass(frozen=True)
class GivenNames:
    """The node names the tool gave nameless nodes (its bookkeeping: the analysis keys by name),
    and the input's own names. A given name, or a new node's name made from one
    (``<given>_<suffix>``), is not written out (:func:`drop_given_names`): it would only grow the file."""

    given: frozenset[str] = frozenset()
    own: frozenset[str] = frozenset()

    def made(self, name: str) -> bool:
        if not name or name in self.own:
            return False
        return name in self.given or any(name[:i] in self.given for i, c in enumerate(name) if c == "_")


def fix_proto_node_names(model: onnx.ModelProto) -> GivenNames:
    """:func:`unique_node_names` on a model's nodes, in place (onnxruntime refuses repeated
    node names; the analysis keys by them); return the names given to nameless nodes."""
    nodes = model.graph.node
    own = frozenset(n.name for g in graphs(model.graph) for n in g.node if n.name)
    names = unique_node_names([n.name for n in nodes], [n.op_type for n in nodes])
    renamed, given = 0, set()
    for node, name in zip(nodes, names):
        if node.name != name:
            if not node.name:
                given.add(name)
            node.name = name
            renamed += 1
    if renamed:
        log.info("named %d unnamed or repeated nodes", renamed)
    return GivenNames(frozenset(given), own)


def drop_given_names(model: onnx.ModelProto, names: GivenNames) -> list[tuple[onnx.NodeProto, str]]:
    """Clear the node names the input did not have (see :class:`GivenNames`), in every
    (sub)graph; return (node, name) of each node cleared."""
    cleared = []
    if not names.given:
        return cleared
    for graph in graphs(model.graph):
        for node in graph.node:
            if names.made(node.name):
                cleared.append((node, node.name))
                node.ClearField("name")
    return cleared


@contextlib.contextmanager
def without_given_names(model: onnx.ModelProto, names: GivenNames):
    """``model`` as it will be written (given names cleared) for the block; the names come back after."""
    cleared = drop_given_names(model, names)
    try:
        yield model
    finally:
        for node, name in cleared:
            node.name = name


def needs_node_names(model: onnx.ModelProto) -> bool:
    names = [n.name for n in model.graph.node]
    return not all(names) or len(set(names)) != len(names)


def fix_node_names(graph: gs.Graph) -> int:
    """:func:`unique_node_names` on a graph's nodes, in place; return how many were renamed."""
    names = unique_node_names([n.name for n in graph.nodes], [n.op for n in graph.nodes])
    renamed = 0
    for node, name in zip(graph.nodes, names):
        if node.name != name:
            node.name = name
            renamed += 1
    return renamed


def remember_node_metadata(model: onnx.ModelProto, graph: gs.Graph) -> None:
    """onnx-graphsurgeon has no node metadata: keep each node's ``metadata_props`` on its
    graph node (right after import, where nodes correspond one to one)."""
    for proto, node in zip(model.graph.node, graph.nodes):
        if proto.metadata_props:
            node._bnslim_metadata = [(p.key, p.value) for p in proto.metadata_props]


def settle_copies(graph: gs.Graph) -> None:
    """A shared weight whose readers all moved to one new value: that value takes the
    weight's name back (one tensor, the same name, an initializer-input stays one)."""
    live: dict[str, list[gs.Tensor]] = {}
    readers = list(graph.nodes)  # If / Loop bodies read outer weights too: those keep the original
    readers += [n for node in graph.nodes for sub in node.subgraphs(recursive=True) for n in sub.nodes]
    for node in readers:
        for t in node.inputs:
            if t.name and all(t is not u for u in live.get(t.name, [])):
                live.setdefault(t.name, []).append(t)
    by_origin: dict[str, list[gs.Constant]] = {}
    for tensors in live.values():
        for t in tensors:
            origin = getattr(t, "_bnslim_from", None)
            if origin and all(t is not u for u in by_origin.get(origin, [])):
                by_origin.setdefault(origin, []).append(t)
    outputs = {t.name for t in graph.outputs}
    for origin, copies in by_origin.items():
        if len(copies) == 1 and origin not in live and origin not in outputs:
            copies[0].name = origin
            del copies[0]._bnslim_from


def copy_origins(graph: gs.Graph) -> dict[str, str]:
    """Name of every derived copy of a weight in ``graph`` -> the weight it came from."""
    origins = {}
    for node in graph.nodes:
        for t in node.inputs:
            origin = getattr(t, "_bnslim_from", None)
            if origin:
                origins[t.name] = origin
    return origins


def hoist_outer_weights(pruned: onnx.ModelProto, original: onnx.ModelProto) -> int:
    """onnx-graphsurgeon writes a constant an If / Loop body reads from the outer scope into
    that body, once per body that reads it: a weight the input held in its main graph goes back
    there, once (a body may read outer initializers), and so does a new constant several bodies
    read. Initializers the input kept inside a body stay there. Returns how many were moved."""
    outer = {t.name for t in original.graph.initializer}
    inner = {t.name for g in list(graphs(original.graph))[1:] for t in g.initializer}
    bodies = list(graphs(pruned.graph))[1:]
    readers: dict[str, int] = {}
    for body in bodies:
        for t in body.initializer:
            readers[t.name] = readers.get(t.name, 0) + 1
    present = {t.name for t in pruned.graph.initializer}
    moved = 0
    for body in bodies:
        kept = []
        for t in body.initializer:
            if t.name in inner or not (t.name in outer or t.name in present or readers[t.name] > 1):
                kept.append(t)  # the body's own: it stays
            elif t.name not in present:  # the first copy goes to the main graph, later ones are dropped
                pruned.graph.initializer.append(t)
                present.add(t.name)
                moved += 1
        if len(kept) != len(body.initializer):
            del body.initializer[:]
            body.initializer.extend(kept)
    return moved


def restore_interface(pruned: onnx.ModelProto, original: onnx.ModelProto, graph: gs.Graph) -> None:
    """Put back what the export dropped: initializers listed as graph inputs (in their
    places, with their pruned shapes; every initializer for IR < 4), node metadata (``graph``
    is the exported graph, node for node) and the graph's metadata."""
    inits = {t.name: t for t in pruned.graph.initializer}
    exported = {v.name: v for v in pruned.graph.input}
    original_inits = {t.name: t for t in original.graph.initializer}
    inputs = []
    for value in original.graph.input:
        if value.name in exported:
            inputs.append(exported[value.name])
        elif value.name in original_inits:  # an initializer-input: overridable weight, or IR < 4
            tensor = inits.get(value.name)
            if tensor is None:  # no node reads it any more: it stays, unchanged, as input and initializer
                tensor = original_inits[value.name]
                pruned.graph.initializer.append(tensor)
                inits[tensor.name] = tensor
            inputs.append(helper.make_tensor_value_info(value.name, value.type.tensor_type.elem_type, list(tensor.dims)))
    listed = {v.name for v in inputs}
    inputs.extend(v for v in pruned.graph.input if v.name not in listed)
    listed |= {v.name for v in pruned.graph.input}
    if original.ir_version < 4:  # IR 3: every initializer is a graph input
        inputs.extend(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims))
                      for t in pruned.graph.initializer if t.name not in listed)
    del pruned.graph.input[:]
    pruned.graph.input.extend(inputs)
    for proto, node in zip(pruned.graph.node, graph.nodes):
        meta = getattr(node, "_bnslim_metadata", None)
        if meta and proto.name == node.name:
            for key, value in meta:
                proto.metadata_props.add(key=key, value=value)
    if hasattr(original.graph, "metadata_props"):
        del pruned.graph.metadata_props[:]
        pruned.graph.metadata_props.extend(original.graph.metadata_props)


def _signature(value: onnx.ValueInfoProto) -> tuple[str, int, int | None]:
    tensor_type = value.type.tensor_type
    rank = len(tensor_type.shape.dim) if tensor_type.HasField("shape") else None
    return value.name, tensor_type.elem_type, rank


def check_interface(original: onnx.ModelProto, pruned: onnx.ModelProto, source: str) -> None:
    """Same inputs and outputs by name, order, element type and rank; same IR and opsets."""
    inits = {t.name for t in pruned.graph.initializer}
    extra = [v for v in pruned.graph.input[len(original.graph.input):] if v.name not in inits or original.ir_version >= 4]
    for kind, a, b in (("inputs", original.graph.input, list(pruned.graph.input[:len(original.graph.input)]) + extra),
                       ("outputs", original.graph.output, pruned.graph.output)):  # IR 3 lists new initializers too
        before, after = [_signature(v) for v in a], [_signature(v) for v in b]
        if before != after:
            raise BnSlimError(f"{source}: the pruned model's {kind} differ from the input's ({before} -> {after}); "
                              "nothing was written. This is a bug in onnx-bnslim: please report it with the model")
    if pruned.ir_version != original.ir_version or \
            sorted((o.domain, o.version) for o in pruned.opset_import) != sorted((o.domain, o.version) for o in original.opset_import):
        raise BnSlimError(f"{source}: the pruned model's IR version or opsets changed; this is a bug in onnx-bnslim")


def _nbytes(t: onnx.TensorProto) -> int:
    dtype = helper.tensor_dtype_to_np_dtype(t.data_type) if t.data_type else np.dtype(np.float32)
    return int(np.prod(t.dims, dtype=np.int64)) * dtype.itemsize


@dataclass
class WeightBytes:
    """Where the pruned model's weight bytes come from, against the input's."""

    before: int
    after: int
    added: int = 0  # new tensors that copy nothing: compensation biases, border maps, folded constants
    copies: int = 0  # distinct slices of weights shared by nodes that keep different channels
    shared: dict[str, int] = field(default_factory=dict)  # weight -> how many distinct tensors it became
    duplicates: list[str] = field(default_factory=list)  # copies with the bytes of another one: a bug
    widened: int = 0  # bytes added by writing weights stored narrow (fp16 + Cast) in a wider type
    widened_stored: int = 0  # those weights' bytes in their storage type (counted in ``added``)


def account(original: onnx.ModelProto, pruned: onnx.ModelProto, origins: dict[str, str],
            widened: dict[str, int] | None = None) -> WeightBytes:
    """``widened``: tensors stored narrower in the input and written wider (fold.restore_storage),
    by name -> their bytes in the storage type: only those bytes count as added."""
    widened = widened or {}
    before = sum(_nbytes(t) for t in _initializers(original))
    before += sum(_nbytes(t) for g in graphs(original.graph) for t in map(constant_tensor, g.node) if t is not None)
    after = _initializers(pruned)
    account = WeightBytes(before, sum(_nbytes(t) for t in after))
    names = {t.name for t in _initializers(original)}
    groups: dict[str, list[onnx.TensorProto]] = {}
    for t in after:
        if t.name in origins:
            account.copies += _nbytes(t)
            groups.setdefault(origins[t.name], []).append(t)
        elif t.name in widened:
            account.added += widened[t.name]
            account.widened_stored += widened[t.name]
            account.widened += _nbytes(t) - widened[t.name]
        elif t.name not in names:
            account.added += _nbytes(t)
    by_name = {t.name: t for t in after}
    for origin, members in groups.items():
        if origin in by_name:
            members.append(by_name[origin])
        account.shared[origin] = len(members)
        seen = set()
        for t in members:
            value = numpy_helper.to_array(t)
            key = (value.dtype.str, value.shape, value.tobytes())
            if key in seen:
                account.duplicates.append(t.name)
            seen.add(key)
    return account


def _initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    """The initializers of the graph and of every If / Loop / Scan body in it (a body holds
    the weights only it reads)."""
    return [t for g in graphs(model.graph) for t in g.initializer]


def check_size(weights: WeightBytes, allow_growth: bool, source: str) -> None:
    """Refuse a pruned model that grew, unless the growth is the price of shared weights whose
    readers keep different channels and ``allow_growth`` (or it stays within 10%)."""
    if weights.duplicates:
        raise BnSlimError(f"{source}: the pruned model holds identical copies of a shared weight "
                          f"({', '.join(weights.duplicates[:3])}); nothing was written. "
                          "This is a bug in onnx-bnslim: please report it with the model")
    # growth by widening: beyond the input, not counting what was added on purpose (border maps, new biases)
    if weights.widened and weights.after - (weights.added - weights.widened_stored) > weights.before and not allow_growth:
        raise BnSlimError(f"{source}: the pruned model's weights ({_mib(weights.after)}) would exceed the input's "
                          f"({_mib(weights.before)}): biases stored as float16 in the input absorbed the removed "
                          f"channels' constants and are written as float32 (+{_mib(weights.widened)}; rounding them "
                          "would undo the compensation); nothing was written. Remove more channels or pass --allow-growth")
    if weights.after > weights.before + weights.added + weights.copies:
        raise BnSlimError(f"{source}: the pruned model's weights ({_mib(weights.after)}) exceed the input's "
                          f"({_mib(weights.before)}) by more than the tensors it added; nothing was written. "
                          "This is a bug in onnx-bnslim: please report it with the model")
    split = sorted(((n, k) for n, k in weights.shared.items() if k > 1), key=lambda x: -x[1])
    if split and weights.after - weights.added > GROWTH_LIMIT * weights.before and not allow_growth:
        why = (f"weights shared by layers that keep different channels (or read whole inside an If / Loop body) are "
               f"written once per slice (e.g. '{split[0][0]}' {split[0][1]} times)")
        raise BnSlimError(f"{source}: the pruned model's weights ({_mib(weights.after)}) would exceed the input's "
                          f"({_mib(weights.before)}) by more than {GROWTH_LIMIT - 1:.0%}: {why}; nothing was written. "
                          "Pass --allow-growth to accept, or --keep the layers that share weights")


def check_file_size(pruned: onnx.ModelProto, limit: int | None, weights: WeightBytes, source: str) -> None:
    """Refuse a pruned model larger on disk than its input (``limit``: the input's serialized
    size; None past protobuf's limit) once the run's record and shape annotations gave way
    (pipeline._add_metadata): one line saying what outweighs the removed channels."""
    if limit is None or too_large_for_protobuf(pruned):
        return
    size = pruned.ByteSize()
    if size <= limit:
        return
    split = sorted(((n, k) for n, k in weights.shared.items() if k > 1), key=lambda x: -x[1])
    if split:
        why = (f"a weight read by layers that keep different channels (or whole inside an If / Loop body) is written "
               f"once per slice ('{split[0][0]}' {split[0][1]} times)")
    elif weights.added:
        why = (f"what the cut added (tensors of {_mib(weights.added)}: biases for the removed channels' constants, "
               "channel selections) outweighs what the removed channels saved")
    else:
        why = "the rewritten graph outweighs what the removed channels saved"
    raise BnSlimError(f"{source}: the pruned model ({size} bytes) would exceed the input's ({limit} bytes): {why}; "
                      "nothing was written. Remove more channels, or pass --allow-growth to accept")


def _mib(n: int) -> str:
    return f"{n / 2**20:.2f} MiB" if n >= 2**20 else f"{n / 1024:.1f} KiB"

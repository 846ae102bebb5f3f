"""One run's stages as a pipeline of passes, each returning its own result:

    prepare (once per run)   load and check -> shapes -> import -> analyse -> calibrate (scale
                             recovery) -> data importance -> the calibration / check split
                             => :class:`Prepared`
    cut (per attempt)        select -> surgery -> export -> compensation by refit => :class:`Cut`
    finish (the kept one)    quantize -> verify -> measure -> report => :class:`Finished`

Surgery edits the analysed graph inside :func:`onnxslim_bn.ir.values.restored`, which puts it
back as analysed when the attempt ends: one preparation serves every attempt that prepares
alike (:func:`preparation_key`, :class:`Pipeline`) -- the ``--target-latency`` attempts, the
collapse and probe alternatives that only change the selection, and every sweep point. No
stage writes into an earlier stage's result.
"""

from __future__ import annotations

import difflib
import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..channels.context import Analysis
from ..errors import BnSlimError
from ..hardware import resolve_round_to
from ..ir import data
from ..ir import runtime as ort_runtime
from ..ir.data import Samples
from ..ir.fold import fold_constants, restore_storage, split_sequences
from ..ir.interface import (
    GivenNames,
    WeightBytes,
    account,
    check_file_size,
    check_interface,
    check_size,
    copy_origins,
    fix_node_names,
    fix_proto_node_names,
    hoist_outer_weights,
    needs_node_names,
    remember_node_metadata,
    restore_interface,
    settle_copies,
    without_given_names,
)
from ..ir.model_io import check_input, graphs, load_model_and_files, model_bytes, too_large_for_protobuf
from ..ir.quantized import fold_dequantized, restore_dequantized
from ..ir.shapes import infer_shapes, resolve_input_shapes, skeleton
from ..ir.values import fix_tensor_names
from ..options import QUANTIZE_NEEDS_DATA, PruneOptions
from ..passes import quantize as int8
from ..passes import verify
from ..passes.analyse import analyze
from ..passes.data_importance import data_importance
from ..passes.importance import add_data_scores, candidates
from ..passes.latency import resolution_note
from ..passes.metrics import Metrics, measure
from ..passes.reconstruct import ReconstructionReport, reconstruct
from ..passes.select import Plan, dead_level, select
from ..passes.surgery import SurgeryStats, apply
from .bench import batch_of
from .report import Report, describe_spaces, run_metadata, weight_name

log = logging.getLogger(__name__)


# ---------------------------------------------------------------- prepare: once per run


@dataclass(frozen=True)
class Reference:
    """The check's inputs, described, and the original's outputs on them: the same for every
    attempt, so the original runs once per preparation (:func:`_verify` runs the pruned model)."""

    feeds: dict[str, np.ndarray]
    count: int  # samples checked
    described: str
    notes: tuple[str, ...]  # about the samples: too few, padded to whole batches
    outputs: list[np.ndarray]  # read-only: every attempt compares against them


@dataclass(frozen=True)
class Prepared:
    """What every attempt of a run starts from; never written after :func:`prepare` returns."""

    key: tuple  # preparation_key of the options it was prepared with
    model: onnx.ModelProto
    source: str
    size_bytes: int | None
    input_shapes: dict[str, list[int]]
    shapes: dict[str, list]
    graph: gs.Graph  # as analysed: attempts edit it inside ir.values.restored only
    analysis: Analysis
    before: Metrics  # the original, counted
    loading_notes: tuple[str, ...]  # the input check, shapes, the calibration split, scale recovery
    ranking_notes: tuple[str, ...]  # importance, and the split the refit or INT8 calibration needs
    session: object | None = None  # onnxruntime session of the original (the input check's or the calibration's)
    # data.Samples: the calibration's share of --data and the check's (disjoint when split, data.split)
    calibration: Samples | None = None
    check: Samples | None = None
    calibration_count: int = 0  # samples the calibration ran on (seeded or data); 0 when none ran
    importance: str = "gamma"  # how the channels were ranked (see _importance)
    # the inputs of the run that gave the layers shapes inference left open (analysis.counted_shapes)
    count_feeds: dict | None = None
    reference: Reference | None = None  # the check's inputs and the original's outputs (None: no check)
    # node names the input did not have (given for the analysis, not written)
    names: GivenNames = field(default_factory=GivenNames)
    input_bytes: int | None = None  # the input's serialized size as given (None past protobuf's 2 GB)

    def notes(self, options: PruneOptions) -> list[str]:
        """The preparation's notes for a run with ``options``; the block note follows the run's
        --round-to (a probe alternative may set the block without preparing again)."""
        block = [resolve_round_to("auto")[1]] if options.round_to == "auto" else []
        return [*self.loading_notes, *block, *self.ranking_notes]


class _Same:
    """Equal only to a wrapper of the very same object: data in memory is not compared by value."""

    def __init__(self, value: object):
        self.value = value

    def __eq__(self, other: object) -> bool:
        return isinstance(other, _Same) and other.value is self.value


def preparation_key(options: PruneOptions) -> tuple:
    """What :func:`prepare` reads of the options: two runs with equal keys prepare alike."""
    data_key = options.data if options.data is None or isinstance(options.data, (str, os.PathLike)) else \
        _Same(options.data)
    shapes = None if options.input_shapes is None else \
        tuple(sorted((k, None if v is None else tuple(v)) for k, v in options.input_shapes.items()))
    return (options.verify, shapes, tuple(options.keep), data_key, options.preprocess, options.calibration_samples,
            options.seed, options.importance, compensation(options), options.quantize, options.check_samples)


class Pipeline:
    """One model's runs: the first preparation is kept and serves every later run whose options
    prepare alike; a run that prepares otherwise (another --keep, another importance) prepares
    its own, which is not kept (one analysed copy of the weights in memory, not one per run)."""

    def __init__(self, model: onnx.ModelProto | str | os.PathLike):
        self.model = model
        self._first: Prepared | None = None

    def prepared(self, options: PruneOptions) -> Prepared:
        if self._first is not None and self._first.key == preparation_key(options):
            return self._first
        prep = prepare(self.model, options)
        if self._first is None:
            self._first = prep
        return prep


def _load(model: onnx.ModelProto | str | os.PathLike, strict: bool = True,
          runtime: bool = True) -> tuple[onnx.ModelProto, str, int | None, list[str], object | None, GivenNames,
                                         int | None]:
    """The model, a name for messages, its size on disk when it came from a file, notes, the
    onnxruntime session of the input, the node names given to its nameless nodes, and its
    serialized size as given (before those names).

    The input is checked before any work: onnx.checker (a stale declared output shape is
    dropped, with a note; a ModelProto passed in is then copied, never modified) and an
    onnxruntime load (its session then serves the check). Either failing is one line about the
    input; without ``strict`` (inspect), a note; without ``runtime`` (``--no-verify``: no
    onnxruntime wanted) the checker alone runs.
    Unnamed and repeated node names are made unique (onnxruntime refuses repeats)."""
    if isinstance(model, onnx.ModelProto):
        proto, source, size = model, model.graph.name or "<model>", None
    else:
        (proto, files), source = load_model_and_files(model), str(model)
        size = sum(p.stat().st_size for p in files)
    serialized = None if too_large_for_protobuf(proto) else proto.ByteSize()
    names = GivenNames()
    if needs_node_names(proto):
        if proto is model:  # never modify the caller's model
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        names = fix_proto_node_names(proto)
    notes: list[str] = []
    session = None
    try:
        proto, notes = check_input(proto, source, copy=proto is model)
        if runtime:  # loads, or one line saying why not; the check's session of the original later
            # (an INT8 model as deployed, optimized: the pruned one is checked so)
            session = ort_runtime.session(proto, f"{source} (the input model)", optimized=int8.is_quantized(proto))
    except BnSlimError as exc:
        if strict:
            raise
        notes.append(f"{exc}; pruning will refuse it")
    return proto, source, size, notes, session, names, serialized


def _import(model: onnx.ModelProto) -> gs.Graph:
    """The graph, with Constant nodes and constant sub-computations turned into constants,
    every node named uniquely (node names are optional and may repeat in ONNX) and node
    metadata remembered for the export."""
    graph = gs.import_onnx(model)
    remember_node_metadata(model, graph)
    fix_node_names(graph)
    fold_constants(graph)
    fold_dequantized(graph)  # a QDQ model's weights: constants to the analysis, written back as the same integers
    if graph.opset >= 13:  # Split takes its sizes as an input from opset 13
        split_sequences(graph)
    return graph


def prepare(model, options: PruneOptions, inspecting: bool = False, measured: bool | None = None) -> Prepared:
    """Load, infer shapes, analyse, calibrate and rank, once. ``inspecting``: an invalid input is
    a note rather than an error, and no calibration share is set apart for the refit or INT8
    (they do not run). ``measured``: whether the analysis counts on measured replacements
    (:func:`.analyse.analyze`; default: :func:`_measured`); when "auto" with --data falls back to
    gamma and that changes which reader BNs score their branch alone, the preparation is redone
    without."""
    measured = _measured(options) if measured is None else measured
    proto, source, size, checked, loaded, given_names, serialized = _load(model, not inspecting, options.verify)
    quantized = _check_quantized(proto, source, options, inspecting, checked)
    input_shapes, notes = resolve_input_shapes(proto, options.input_shapes, source)
    notes = checked + notes
    shapes = infer_shapes(proto, input_shapes, source)
    graph = _import(proto)
    protected = protected_layers(graph, options)
    protect = protected.__contains__ if options.keep else None
    analysis = analyze(graph, shapes, protect, measured=measured)
    if options.keep:
        _check_keep(analysis, options, protected, source)
    samples = None if options.data is None else data.load(options.data, proto, input_shapes, options.preprocess)
    count_feeds = _count_open_layers(proto, shapes, input_shapes, samples, analysis, options, source, notes)
    calibration = check = samples
    recovery = candidates(analysis)
    analysis.apply(recovery.scores)
    found, sess, count = recovery.found, None, 0
    # Calibration: activation statistics of the original (scale recovery). With data, it takes its
    # share of the samples (data.split) and the check the rest; a stage that needs calibration
    # later (reconstruction, INT8) takes the same share.
    if found:  # one session of the original serves the calibration and, later, the check
        names = [t.name for _, t, _ in found]
        loaded = None  # the input's first session: this one (with the scale tensors as outputs) replaces it
        sess = ort_runtime.session(proto, source, extra_outputs=names)
        if samples is not None:
            calibration, check, split_note = data.split(samples, options.calibration_samples)
            notes.extend([split_note] if split_note else [])
            feeds, described = calibration.arrays, calibration.describe()
        else:
            feeds, described = verify.make_inputs(proto, input_shapes, None, options.seed, calibration=True)
            described = f"{ort_runtime.count(feeds)} seeded N(0,1) samples"
        count = ort_runtime.count(feeds)
        analysis.apply(add_data_scores(analysis, found, ort_runtime.run(sess, feeds, verify.static_batch(proto), names)))
        notes.append(f"no BatchNormalization for some layers: their BN scale was recovered from activation statistics "
                     f"on {described}" + ("" if samples is not None else "; pass --data with real inputs for a closer estimate"))
    if measured and analysis.readers and _importance(analysis, options) == "gamma" and \
            len(analyze(graph, shapes, protect).selectors) != len(analysis.selectors):
        return prepare(model, options, inspecting, measured=False)
    ranking = _rank(analysis, proto, input_shapes, options, samples, calibration if count else None, check, count)
    if not inspecting and ranking.calibration is None and ranking.check is not None and \
            (compensation(options) == "reconstruct" or options.quantize):  # the refit's / INT8's share
        calibration, check, note = data.split(ranking.check, options.calibration_samples)
        ranking = replace(ranking, calibration=calibration, check=check, count=calibration.count,
                          notes=ranking.notes + ([note] if note else []))
    before = measure(graph, {**shapes, **analysis.counted_shapes}, size or serialized or model_bytes(proto))
    session = sess or loaded
    if quantized and sess is not None:  # the INT8 original checked as deployed, as the pruned model will be
        session = ort_runtime.session(proto, source, optimized=True)
    reference = None
    if options.verify and not inspecting and analysis.prunable():  # every attempt's check compares against it
        reference = _reference(proto, source, session, input_shapes, options, ranking)
    return Prepared(preparation_key(options), proto, source, size, input_shapes, shapes, graph, analysis, before,
                    tuple(notes), tuple(ranking.notes), session, ranking.calibration, ranking.check,
                    ranking.count, ranking.importance, count_feeds, reference, given_names, serialized)


def _check_quantized(proto: onnx.ModelProto, source: str, options: PruneOptions, inspecting: bool,
                     notes: list[str]) -> bool:
    """Whether the input is an INT8 model. A QDQ model prunes (its weights' integers sliced,
    :mod:`onnxslim_bn.ir.quantized`) but is not quantized again; a QOperator model does not
    prune (its layers are integer kernels): one line saying so (a note when inspecting)."""
    qoperator = int8.qoperator_ops(proto)
    if qoperator:
        message = f"{source}: a QOperator INT8 model ({', '.join(qoperator[:4])}); {int8.QDQ_HOWTO}"
        if not inspecting:
            raise BnSlimError(message)
        notes.append(f"{message}; pruning will refuse it")
    quantized = int8.is_quantized(proto)
    if quantized and options.quantize and not inspecting:
        raise BnSlimError(f"{source}: already quantized (QDQ); drop --quantize {options.quantize}: a QDQ model prunes "
                          "as it is and stays INT8 with its own integers")
    if options.quantize and options.data is None and not inspecting:  # after the QDQ refusal: it is the fix
        raise BnSlimError(QUANTIZE_NEEDS_DATA)
    if quantized and not qoperator:
        notes.append("QDQ input: its weights are pruned as their integers (per-channel scales and zero points sliced "
                     "with them, per-tensor ones kept), its activation QuantizeLinear/DequantizeLinear pairs kept; "
                     "both INT8 models are checked as deployed (onnxruntime's INT8 kernels)")
    return quantized


def _reference(proto: onnx.ModelProto, source: str, session, input_shapes: dict, options: PruneOptions,
               ranking: _Ranking) -> Reference:
    """The check's samples (the data's check share, else seeded N(0,1) samples) and the
    original's onnxruntime outputs on them."""
    batch, check, notes = verify.static_batch(proto), ranking.check, []
    if check is not None:
        feeds, count = check.arrays, check.count
        apart = ", also used for calibration" if ranking.count and check is ranking.calibration else \
            ", not used for calibration"
        described = f"{check.describe()}{apart}"
        if count < verify.CHECK_SAMPLES:
            notes.append(f"the check ran on {count} samples only; pass at least {verify.CHECK_SAMPLES} for a check "
                         "that can tell a small agreement loss from chance")
    else:
        count = verify.check_sample_count(proto, options.check_samples)
        feeds = verify.random_inputs(proto, input_shapes, options.seed, count, stream=1)
        described = f"{count} seeded N(0,1) samples, not used for calibration"
    notes.extend(n for n in [verify.padding_note(count, batch, "check")] if n)
    names = [o.name for o in proto.graph.output]
    try:
        outputs = ort_runtime.run(session or ort_runtime.session(proto, source), feeds, batch, names)
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        if isinstance(exc, BnSlimError) or check is not None:
            raise
        raise BnSlimError(f"{source}: onnxruntime fails on the check's seeded N(0,1) inputs "
                          f"({str(exc).splitlines()[0][:200]}): this model needs real inputs; pass them with --data") from exc
    for values in outputs:
        values.flags.writeable = False
    return Reference(feeds, count, described, tuple(notes), outputs)


def _count_open_layers(proto, shapes, input_shapes, samples, analysis: Analysis, options: PruneOptions,
                       source: str, notes: list[str]) -> dict | None:
    """Layers whose shapes inference left open (a Resize sized from an input's values) would count
    0 MACs: their shapes come from one run instead (the first --data samples, else the seeded
    inputs), into ``analysis.counted_shapes``, and a note names them. Returns that run's inputs."""
    layers, tensors = verify.open_layer_shapes(proto, shapes)
    if not layers:
        return None
    batch = next((v[0] for v in input_shapes.values() if v), 1)
    names = ", ".join(layers[:4]) + (f" and {len(layers) - 4} more" if len(layers) > 4 else "")
    if samples is not None:
        feeds, described = batch_of(samples.arrays, batch), f"the first {batch} of {samples.describe()}"
    else:
        try:
            feeds = verify.make_inputs(proto, input_shapes, None, options.seed)[0]
        except BnSlimError:  # integer inputs: no random stand-in
            notes.append(f"shape inference cannot resolve the shapes of {names}: their MACs are not counted (0) and "
                         "budgets cannot see them; pass --data so that a run on real inputs can count them")
            return None
        described = "seeded N(0,1) inputs"
    try:
        analysis.counted_shapes = verify.concrete_shapes(proto, tensors, feeds, f"{source} (counting layer shapes)")
    except BnSlimError:
        if samples is not None:
            raise
        notes.append(f"shape inference cannot resolve the shapes of {names}, and onnxruntime fails on seeded N(0,1) "
                     "inputs: their MACs are not counted (0); pass --data with real inputs")
        return None
    notes.append(f"shape inference cannot resolve the shapes of {names}: their MACs are counted from the shapes of "
                 f"one run on {described}; they hold for inputs like these")
    return feeds


def _measured(options: PruneOptions) -> bool:
    """Whether the replacements may be measured: importance from data, or "auto" with --data
    (which falls back to gamma on a sparsity-trained model: see :func:`prepare`)."""
    return options.importance == "data" or (options.importance == "auto" and options.data is not None)


def _importance(analysis: Analysis, options: PruneOptions) -> str:
    """"auto": data when --data is given and the scales show no dead cluster (a model trained
    without the L1 penalty), gamma otherwise."""
    if options.importance != "auto":
        return options.importance
    if options.data is None:
        return "gamma"
    scores = [s.scores() for s in analysis.prunable() if s.sources]
    flat = np.concatenate(scores) if scores else np.zeros(0)
    return "data" if dead_level(flat) == 0.0 else "gamma"


@dataclass(frozen=True)
class _Ranking:
    importance: str
    calibration: Samples | None
    check: Samples | None
    count: int
    notes: list[str]


def _rank(analysis: Analysis, proto: onnx.ModelProto, input_shapes: dict, options: PruneOptions, samples,
          calibration: Samples | None, check: Samples | None, count: int) -> _Ranking:
    """How the channels are ranked; with data importance (:mod:`.data_importance`), its scores on
    the calibration share of the samples (split here when scale recovery did not split them)."""
    importance = _importance(analysis, options)
    if importance != "data":
        return _Ranking(importance, calibration, check, count, ["importance: gamma (|BN scale| ranks the channels)"])
    notes = []
    if calibration is None and samples is not None:
        calibration, check, note = data.split(samples, options.calibration_samples)
        notes.extend([note] if note else [])
    if calibration is not None:
        feeds, described = calibration.arrays, calibration.describe()
    else:
        feeds, _ = verify.make_inputs(proto, input_shapes, None, options.seed, calibration=True)
        described = f"{ort_runtime.count(feeds)} seeded N(0,1) samples (pass --data: random inputs rank channels poorly)"
    count = max(count, ort_runtime.count(feeds))
    ranking = data_importance(analysis, proto, feeds)
    analysis.apply(ranking.scores)
    measured, ranked = ranking.measured, ranking.ranked
    if ranked:
        notes.append(f"{ranked} channel group{'s' if ranked > 1 else ''} without a BatchNorm scale "
                     "(left alone with gamma) ranked by data too")
    notes.append(f"importance: data (each channel's share of the output variance at its {measured} consumers, "
                 f"on {described})")
    return _Ranking(importance, calibration, check, count, notes)


def compensation(options: PruneOptions) -> str:
    return "reconstruct" if options.refits() else "bias"


def protected_layers(graph: gs.Graph, options: PruneOptions) -> set[str]:
    """Names of the nodes a --keep pattern matches, by node name or by the name of a weight it reads."""
    if not options.keep:
        return set()
    return {n.name for n in graph.nodes if options.protects(n.name, _weights(n))}


def _weights(node: gs.Node) -> list[str]:
    return [t.name for t in node.inputs if isinstance(t, gs.Constant)] + [weight_name(node)]


def _check_keep(analysis: Analysis, options: PruneOptions, protected: set[str], source: str) -> None:
    """Every --keep pattern must name at least one layer (a Conv / Gemm / MatMul that opens channels)."""
    layers = [n for n in analysis.nodes if any(n.name in s.producers for s in analysis.spaces)]
    for pattern in options.keep:
        if any(PruneOptions(keep=[pattern]).protects(n.name, _weights(n)) for n in layers):
            continue
        names = sorted({n.name for n in layers} | {weight_name(n) for n in layers})
        close = difflib.get_close_matches(pattern, names, n=3, cutoff=0.3) or names[:3]
        raise BnSlimError(f"{source}: --keep '{pattern}' matches no layer's node or weight name; closest: "
                          f"{', '.join(close)} (patterns are fnmatch, e.g. 'layer4.*' or '/layer4/*')")


# ---------------------------------------------------------------- cut: per attempt, inside ir.values.restored


@dataclass(frozen=True)
class Cut:
    """One attempt's pruned model (FP32, compensated), and how it was made."""

    plan: Plan
    stats: SurgeryStats
    resolved: dict  # every option as the run used it (the report's options)
    pruned: onnx.ModelProto
    reconstruction: ReconstructionReport | None
    notes: tuple[str, ...]  # the selection's, the latency table's, the refit's
    seconds: dict


def cut(prep: Prepared, options: PruneOptions, target: float | None = None, curves: dict | None = None,
        started: float | None = None) -> Cut:
    """Select (at ``target`` for --target-latency, on the layer table ``curves``), cut the graph,
    export it and compensate by refit when the run asks for it. Edits ``prep.graph``: call it
    inside :func:`onnxslim_bn.ir.values.restored`."""
    clock = time.perf_counter() if started is None else started
    plan = select(prep.analysis, replace(options, target_latency=target) if target else options, curves)
    notes = list(plan.notes)
    blind = resolution_note(curves) if target is not None and curves else None
    if blind:  # below the timer's resolution: those layers were costed by MACs
        notes.append(blind)
        plan = replace(plan, budget={**plan.budget,
                                     "macs_proxy_layers": sorted(n for n, c in curves.items() if not c.resolved)})
    # a refit keeps the border maps of removed constants where they make it more exact (reconstruct.py)
    stats = apply(prep.analysis, plan, options.exact_borders or compensation(options) == "reconstruct")
    resolved = _options_resolved(options, prep)
    resolved["round_to"] = plan.budget.get("round_to", resolved["round_to"])  # a budget may need a finer block
    resolved["max_layer_ratio"] = plan.budget.get("layer_cap", resolved["max_layer_ratio"])  # or a wider cap
    # the file no larger than the input's (issue 16), unless --allow-growth, or --exact-borders (it asks
    # for the border maps whatever they weigh); a refit settles its maps first, then the file is held to it.
    # With --quantize the FP32 model is not written: the INT8 file is held to it (_quantize)
    limited = not (options.allow_growth or options.exact_borders or options.quantize)
    refit = compensation(options) == "reconstruct"
    metadata = run_metadata(resolved)
    pruned = _export(prep, metadata, options.allow_growth, limited and not refit)
    seconds = {"prune": time.perf_counter() - clock}
    reconstruction = None
    if refit:
        clock = time.perf_counter()
        pruned, reconstruction, stats, refit_notes = _reconstruct(prep, pruned, options, stats)
        notes.extend(refit_notes)
        seconds["reconstruct"] = time.perf_counter() - clock
        _fit(prep, pruned, metadata, account(prep.model, pruned, copy_origins(prep.graph)) if limited else None)
    return Cut(plan, stats, resolved, pruned, reconstruction, tuple(notes), seconds)


def _reconstruct(prep: Prepared, pruned: onnx.ModelProto, options: PruneOptions, stats: SurgeryStats):
    """Refit the layers whose inputs were pruned on the calibration share of the data (set apart
    in :func:`prepare`). Layers under --keep stay as they are; border maps stay where the user
    asked for them (--exact-borders) or where they make the refit more exact within the input's
    size. Returns the refit model, its report, the surgery's figures and notes."""
    if prep.check is None:
        raise BnSlimError(f"{prep.source}: --compensation reconstruct refits layers on calibration data; "
                          "pass --data (an .npz, .npy or a folder of images) or use --compensation bias")
    refit, result = reconstruct(prep.model, pruned, prep.calibration.arrays, seed=options.seed,
                                frozen=protected_layers(prep.graph, options), keep_maps=options.exact_borders)
    notes = [result.summary()]
    if result.maps_too_large:
        notes.append(f"reconstruction: {result.maps_too_large} border map{'s' if result.maps_too_large > 1 else ''} "
                     "(the exact correction where removed constants meet a conv's padding) left out: they would "
                     "make the model larger than the input; --exact-borders keeps them")
    for label, reason in result.skipped:
        notes.append(f"reconstruction left {label} as bias folding made it: {reason}")
    return refit, result, replace(stats, border_maps=stats.border_maps - result.maps_dropped), notes


def _export(prep: Prepared, metadata: dict[str, str], allow_growth: bool = False,
            limited: bool = True) -> onnx.ModelProto:
    """The pruned graph as a model with the input's interface (inputs, outputs, IR, opsets,
    metadata), unique tensor names, weights no larger than the input's (see interface), and,
    when ``limited``, a file no larger than the input's (:func:`_fit`)."""
    settle_copies(prep.graph)
    widened = restore_storage(prep.graph)  # fp16 weights behind a Cast stay fp16
    restored = restore_dequantized(prep.graph)  # a QDQ model's weights: DequantizeLinear of the same integers
    if restored.left_float:
        log.warning("%s: %d quantized weights changed by the compensation stay float: %s", prep.source,
                    len(restored.left_float), ", ".join(restored.left_float[:5]))
    fix_tensor_names(prep.graph)
    origins = copy_origins(prep.graph)
    pruned = gs.export_onnx(prep.graph, do_type_check=False)
    original = prep.model
    pruned.ir_version = original.ir_version
    del pruned.opset_import[:]
    pruned.opset_import.extend(original.opset_import)
    for name in ("producer_name", "producer_version", "model_version", "domain", "doc_string"):
        pruned.ClearField(name)  # proto2: a field set to its default is still written; only the input's are
        if original.HasField(name):
            setattr(pruned, name, getattr(original, name))
    for graph in graphs(pruned.graph):  # proto2 writes an empty string that is set: "no name" is smaller
        for node in graph.node:
            for name in ("name", "domain", "doc_string"):
                if node.HasField(name) and not getattr(node, name):
                    node.ClearField(name)
    hoist_outer_weights(pruned, original)  # one copy of a weight that If / Loop bodies read, where it was
    restore_interface(pruned, original, prep.graph)
    check_interface(original, pruned, prep.source)
    weights = account(original, pruned, origins, widened)
    check_size(weights, allow_growth, prep.source)
    try:  # annotate shapes from a weight-less copy: no second copy of the weights in memory
        inferred = onnx.shape_inference.infer_shapes(skeleton(pruned, None), strict_mode=True)
        known = {t.name for t in pruned.graph.initializer} | {t.name for t in pruned.graph.input} | \
            {v.name for v in pruned.graph.value_info}
        # graphsurgeon's export annotates more than the input did, in subgraphs too (_fit drops them first)
        pruned.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
        _fit(prep, pruned, metadata, weights if limited else None)
        return pruned
    except onnx.shape_inference.InferenceError as exc:
        raise BnSlimError(f"{prep.source}: the pruned graph fails shape inference ({str(exc).splitlines()[0]}); "
                          "nothing was written. This is a bug in onnx-bnslim: please report it with the model") from exc


def _fit(prep: Prepared, pruned: onnx.ModelProto, metadata: dict[str, str], weights: WeightBytes | None) -> None:
    """The run's record and the shape annotations, as far as the file stays within the input's
    size (:func:`_add_metadata`), measured as written (without the node names the tool gave,
    which api.prune drops); with ``weights``, a file still larger is refused (check_file_size)."""
    given = {v.name for g in graphs(prep.model.graph) for v in g.value_info}
    with without_given_names(pruned, prep.names):
        _add_metadata(pruned, prep.model, prep.input_bytes, metadata, given)
        if weights is not None:
            check_file_size(pruned, prep.input_bytes, weights, prep.source)


def _add_metadata(pruned: onnx.ModelProto, original: onnx.ModelProto, limit: int | None, metadata: dict[str, str],
                  given: set[str]) -> None:
    """The input's metadata_props, then this run's (an earlier run's keys, pruned again, give way):
    tool, version and options (report.run_metadata). When that would make the file larger than
    its input (a run that removed almost nothing), less is added: the options go first, then the
    rest of the record, then the shape annotations this run added (``value_info`` not in
    ``given``); the JSON report keeps the whole record either way. ``limit``: the input's
    serialized size (None: past protobuf's limit, no limit)."""
    records = [metadata, {k: v for k, v in metadata.items() if k != "onnx-bnslim.options"}, {}, None]
    for record in records:
        if record is None:  # the last resort: the shape annotations this run added, in every (sub)graph
            for graph in graphs(pruned.graph):
                kept = list({v.name: v for v in reversed(graph.value_info) if v.name in given}.values())[::-1]
                del graph.value_info[:]
                graph.value_info.extend(kept)
            return
        del pruned.metadata_props[:]
        pruned.metadata_props.extend(p for p in original.metadata_props if p.key not in metadata)
        for key, value in record.items():
            pruned.metadata_props.add(key=key, value=value)
        if limit is None or too_large_for_protobuf(pruned) or pruned.ByteSize() <= limit:
            return


def _options_resolved(options: PruneOptions, prep: Prepared) -> dict:
    """Every option as the run used it: defaults filled in, input shapes fixed, --keep resolved to layers."""
    out = asdict(options) if options.data is None or isinstance(options.data, (str, os.PathLike)) else \
        asdict(replace(options, data=None))
    out["data"] = data.describe_option(options.data)
    out["input_shapes"] = {k: list(v) for k, v in prep.input_shapes.items()}
    out["round_to"] = options.block()
    out["max_layer_ratio"] = options.layer_cap()
    out["importance"] = prep.importance
    out["compensation"] = compensation(options)
    layers = {name for s in prep.analysis.spaces for name in s.producers}
    out["protected_layers"] = sorted(protected_layers(prep.graph, options) & layers)
    return out


# ---------------------------------------------------------------- finish: the attempt kept


@dataclass(frozen=True)
class Finished:
    """A run's end result: the deployed model (INT8 with --quantize), its report and its check."""

    model: onnx.ModelProto
    report: Report
    check_inputs: dict
    check_outputs: list
    reconstruction: ReconstructionReport | None
    fp32_model: onnx.ModelProto | None  # with --quantize: the pruned FP32 model the INT8 one came from
    # with --quantize: the calibration share of --data (the NNCF IR calibrates on it too)
    calibration_inputs: dict = field(default_factory=dict)
    # with the check: the original's outputs on its samples (the first ``verification.samples`` of check_inputs)
    reference_outputs: list = field(default_factory=list)


def finish(prep: Prepared, done: Cut, options: PruneOptions, given: dict, notes: list[str]) -> Finished:
    """Quantize (with --quantize), check the deployed model against the original, and count and
    report it; ``notes`` are the run's so far. Reads the pruned graph: call it inside the same
    :func:`onnxslim_bn.ir.values.restored` block as the :func:`cut`. The gates' failure is
    recorded in the report's check, not raised."""
    seconds, notes = dict(done.seconds), list(notes)
    pruned, quantized = done.pruned, None
    if options.quantize:  # INT8 after pruning and compensation: the deployed model (quantize.py)
        quantized = _quantize(prep, pruned, options, notes)
        seconds["quantize"] = quantized.seconds
    deployed = pruned if quantized is None else quantized.model
    clock = time.perf_counter()
    pruned_shapes = infer_shapes(pruned, prep.input_shapes, "the pruned model")
    verification, feeds, outputs = None, {}, []
    what = f"{prep.source} (pruned" + (" + INT8)" if quantized is not None else ")")
    if options.verify:  # the deployed model against the original: the gates apply to the end result
        verification, feeds, outputs = _verify(prep, deployed, options, what)
    else:  # the checker runs even without the onnxruntime comparison
        verify.check_model(deployed, what)
    seconds["verify"] = time.perf_counter() - clock
    report = Report(
        model=prep.source, output=None, options=done.resolved, options_given=given, before=prep.before,
        after=_measure(prep, pruned, pruned_shapes, model_bytes(deployed), f"{prep.source} (pruned)"),
        verification=verification, surgery=done.stats, spaces=describe_spaces(prep.analysis, done.plan),
        notes=notes, seconds=seconds, chosen_channels=done.plan.chosen, selection=done.plan.summary())
    if quantized is not None:
        report.quantization = _quantization_report(prep, pruned, quantized, verification, feeds, outputs)
    return Finished(deployed, report, feeds, outputs, done.reconstruction, pruned if quantized is not None else None,
                    prep.calibration.arrays if quantized is not None else {},
                    list(prep.reference.outputs) if verification is not None else [])


def _measure(prep: Prepared, model: onnx.ModelProto, shapes: dict, size: int, what: str) -> Metrics:
    """metrics.measure of the pruned graph, with the shapes inference left open from a run of
    ``model`` on the counting run's inputs."""
    if prep.count_feeds is not None:
        _, tensors = verify.open_layer_shapes(model, shapes)
        shapes = {**shapes, **verify.concrete_shapes(model, tensors, prep.count_feeds, what)}
    return measure(prep.graph, shapes, size)


def _quantize(prep: Prepared, pruned: onnx.ModelProto, options: PruneOptions, notes: list[str]) -> int8.Quantized:
    """The pruned model in INT8, calibrated on the calibration share of the data (set apart in
    :func:`prepare`); refused when the two cannot be kept apart. Its notes go to ``notes``."""
    if prep.check is None:
        raise BnSlimError(f"{prep.source}: {int8.NEEDS_DATA}")
    if prep.calibration is prep.check:
        raise BnSlimError(f"{prep.source}: --quantize int8 calibrates on samples the check does not use, but "
                          f"{prep.check.source} has only {prep.check.count}; pass more samples (64 or more) or "
                          "--calibration-samples N to split them")
    quantized, found = int8.quantize_with_fallback(pruned, prep.calibration.arrays, f"{prep.source} (pruned)",
                                                   verify.static_batch(prep.model), options.int8_fp32)
    limit = prep.input_bytes
    if not (options.allow_growth or options.exact_borders) and limit is not None \
            and not too_large_for_protobuf(quantized.model) and quantized.model.ByteSize() > limit:
        raise BnSlimError(f"{prep.source}: the INT8 model ({quantized.model.ByteSize()} bytes) would exceed the input's "
                          f"({limit} bytes): its quantize / dequantize pairs outweigh what INT8 weights and the cut "
                          "saved; nothing was written. Pass --allow-growth to accept, or drop --quantize")
    s = quantized.settings
    notes.append(f"quantized to INT8 ({s.format}, {s.weights} per-channel weights, {s.activations} activations: "
                 f"{s.reason}) with {s.calibration} ranges on {prep.calibration.describe()}, "
                 f"in {quantized.seconds:.1f} s")
    if found is not None and found.chosen:
        notes.append(f"kept in FP32, their quantization dominating the INT8 error: {', '.join(found.chosen)} "
                     f"(relative error against the FP32 model on {found.samples} calibration samples "
                     f"{found.error:.3g} -> {found.error_after:.3g})")
    quantized.sensitivity = found
    return quantized


def _quantization_report(prep: Prepared, pruned: onnx.ModelProto, quantized: int8.Quantized, verification,
                         feeds: dict, outputs: list) -> dict:
    """How the model was quantized, and the check's two steps apart (on the same check samples):
    original -> slim (what pruning cost), slim -> INT8 (what quantization cost), and the total."""
    found = quantized.sensitivity
    out = {"settings": quantized.settings.to_dict(), "calibration_samples": quantized.calibration_samples,
           "excluded_nodes": quantized.excluded, "sensitivity": None if found is None else found.to_dict(), "steps": {}}
    if verification is None:
        return out
    names = [o.name for o in prep.model.graph.output]
    batch, count = verify.static_batch(prep.model), verification.samples
    original = ort_runtime.run(prep.session or ort_runtime.session(prep.model, prep.source), feeds, batch, names)
    slim = ort_runtime.run(ort_runtime.session(pruned, f"{prep.source} (pruned)"), feeds, batch, names)
    deployed = ort_runtime.first_samples(outputs, count, ort_runtime.count(feeds))
    original, slim = (ort_runtime.first_samples(o, count, ort_runtime.count(feeds)) for o in (original, slim))
    described = verification.inputs
    pruning = verify.compare(prep.model, names, original, slim, count, described, f"{prep.source} (pruned)")
    quantization = verify.compare(prep.model, names, slim, deployed, count, described, f"{prep.source} (INT8)")
    out["steps"] = {"pruning": int8.step_metrics(pruning), "quantization": int8.step_metrics(quantization),
                    "total": int8.step_metrics(verification)}
    return out


def _verify(prep: Prepared, pruned: onnx.ModelProto, options: PruneOptions, what: str | None = None):
    """The check (verify's module doc): checker, then the pruned model in onnxruntime on the
    check's samples, compared output by output with the original's (:class:`Reference`) and
    gated. A failed gate is recorded in ``failed``; :func:`onnxslim_bn.app.api.prune` raises after
    building the report."""
    what = what or f"{prep.source} (pruned)"
    verify.check_model(pruned, what)
    batch = verify.static_batch(prep.model)
    reference = prep.reference
    feeds, count, described, before, notes = (reference.feeds, reference.count, reference.described,
                                              reference.outputs, list(reference.notes))
    names = [o.name for o in prep.model.graph.output]
    padded = ort_runtime.pad(feeds, batch)  # whole batches, for the OpenVINO check too
    after_padded = ort_runtime.run(ort_runtime.session(pruned, what, optimized=int8.is_quantized(pruned)), padded, batch, names)
    after = ort_runtime.first_samples(after_padded, count, ort_runtime.count(padded))
    result = verify.compare(prep.model, names, before, after, count, described, what)
    result.random, result.calibration_samples = prep.check is None, prep.calibration_count
    result.disjoint = prep.check is None or prep.calibration is None or prep.check is not prep.calibration
    for o in result.outputs:
        if o.near_constant:
            notes.append(f"random inputs do not exercise output '{o.name}' of this model (nearly constant on them, "
                         f"|values| up to {o.max_abs_value:.3g}); pass --data" if result.random else
                         f"output '{o.name}' is nearly constant on the check samples: the check says little about it")
        if o.nonfinite and not o.nonfinite_mismatch:
            notes.append(f"output '{o.name}' is NaN/Inf at {o.nonfinite} positions in both models alike; "
                         "its metrics cover the finite positions")
    result.notes = notes
    result.failed = result.gate(options.max_error, options.min_cosine, options.max_rel_error)
    return result, padded, after_padded

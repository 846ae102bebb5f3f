"""The Python API: ``prune`` and ``inspect``. The command line is a thin layer over these."""

from __future__ import annotations

import difflib
import glob
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..passes import collapse, verify
from ..ir import data
from ..ir import runtime as ort_runtime
from ..channels.context import Analysis
from ..passes.analyse import analyze
from ..ir.data import Samples
from ..errors import BnSlimError, CheckFailed
from ..ir.fold import fold_constants, restore_storage, split_sequences
from ..passes.importance import add_data_scores, candidates
from ..passes.metrics import measure
from ..ir.model_io import weight_bytes
from ..ir.values import fix_tensor_names
from ..ir.weights import LAYER_OPS
from ..ir.interface import account, check_interface, check_size, copy_origins, fix_node_names, fix_proto_node_names, needs_node_names, remember_node_metadata, restore_interface, settle_copies
from ..ir.model_io import check_input, load_model_and_files, too_large_for_protobuf
from ..ir.openvino_ir import OpenVinoResult, export_ir
from ..ir.openvino_ir import require as require_openvino
from ..passes.data_importance import data_importance
from .bench import batch_of, probe, probe_inputs, time_pair
from ..hardware import resolve_round_to
from ..passes.latency import layer_latency_table, resolution_note
from ..passes.select import dead_level, Plan, select
from ..options import PruneOptions
from ..passes import quantize as int8
from ..passes.reconstruct import ReconstructionReport, reconstruct
from .report import Report, SpaceReport, describe_spaces, run_metadata, weight_name
from ..ir.shapes import infer_shapes, resolve_input_shapes, skeleton
from ..passes.surgery import apply

log = logging.getLogger(__name__)

KEEP_BN_FLAGS = ("torch.onnx.export(..., dynamo=False, do_constant_folding=False), "
                 "torch.onnx.export(..., dynamo=True, optimize=False), onnxsim --skip-fuse-bn, "
                 "onnxslim --skip-fusion-patterns FusionConvBN")


@dataclass
class PruneResult:
    model: onnx.ModelProto
    report: Report
    # the check's inputs and the pruned model's onnxruntime outputs on them (empty without a check)
    check_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    check_outputs: list[np.ndarray] = field(default_factory=list)
    reconstruction: ReconstructionReport | None = None  # when compensation was by reconstruction
    # with --quantize: ``model`` is the deployed INT8 model and this the pruned FP32 one it came from
    fp32_model: onnx.ModelProto | None = None


def to_openvino(result: PruneResult, out_dir: str | os.PathLike, name: str = "model", fp16: bool = False) -> OpenVinoResult:
    """Write the pruned model as OpenVINO IR and check OpenVINO against onnxruntime on the
    inputs of the pruned model's check. Adds the outcome to ``result.report``."""
    if not result.check_inputs:
        raise BnSlimError("the OpenVINO check needs the onnxruntime check's inputs: prune with verify=True")
    ir = export_ir(result.model, out_dir, name, fp16, result.check_inputs, result.check_outputs,
                   _int8_ir_tolerance(result.report.quantization, fp16))
    result.report.openvino = ir
    return ir


def _int8_ir_tolerance(quantization: dict | None, fp16: bool) -> float | None:
    """An INT8 model in OpenVINO (its ONNX reader turns the QDQ pairs into FakeQuantize: an INT8
    IR) rounds apart from onnxruntime's INT8 kernels: it may differ from them by twice what INT8
    changed in onnxruntime (slim -> slim + INT8, relative to the largest |output|), at least 1%."""
    if not quantization or not quantization.get("steps"):
        return None
    return max(2 * quantization["steps"]["quantization"]["max_rel_diff"], 1e-2, 2e-2 if fp16 else 0.0)


@dataclass
class InspectResult:
    spaces: list[SpaceReport]
    notes: list[str]
    ratio: float | None


def _load(model: onnx.ModelProto | str | os.PathLike, strict: bool = True,
          runtime: bool = True) -> tuple[onnx.ModelProto, str, int | None, list[str]]:
    """The model, a name for messages, its size on disk when it came from a file, and notes.

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
    if needs_node_names(proto):
        if proto is model:  # never modify the caller's model
            proto = onnx.ModelProto()
            proto.CopyFrom(model)
        fix_proto_node_names(proto)
    notes: list[str] = []
    session = None
    try:
        proto, notes = check_input(proto, source, copy=proto is model)
        if runtime:  # loads, or one line saying why not; the check's session of the original later
            session = ort_runtime.session(proto, f"{source} (the input model)")
    except BnSlimError as exc:
        if strict:
            raise
        notes.append(f"{exc}; pruning will refuse it")
    return proto, source, size, notes, session


def _import(model: onnx.ModelProto) -> gs.Graph:
    """The graph, with Constant nodes and constant sub-computations turned into constants,
    every node named uniquely (node names are optional and may repeat in ONNX) and node
    metadata remembered for the export."""
    graph = gs.import_onnx(model)
    remember_node_metadata(model, graph)
    fix_node_names(graph)
    fold_constants(graph)
    if graph.opset >= 13:  # Split takes its sizes as an input from opset 13
        split_sequences(graph)
    return graph


@dataclass
class _Prepared:
    model: onnx.ModelProto
    source: str
    size_bytes: int | None
    input_shapes: dict[str, list[int]]
    notes: list[str]
    shapes: dict[str, list]
    graph: gs.Graph
    analysis: Analysis
    session: object | None = None  # onnxruntime session of the original, when calibration built one
    # data.Samples: the calibration's share of --data and the check's (disjoint when calibration ran, data.split)
    calibration: Samples | None = None
    check: Samples | None = None
    calibration_count: int = 0  # samples the calibration ran on (seeded or data); 0 when none ran
    importance: str = "gamma"  # how the channels were ranked (see _importance)
    # the inputs of the run that gave the layers shapes inference left open (analysis.counted_shapes)
    count_feeds: dict | None = None


def _prepare(model, options: PruneOptions, strict: bool = True) -> _Prepared:
    proto, source, size, checked, loaded = _load(model, strict, options.verify)
    input_shapes, notes = resolve_input_shapes(proto, options.input_shapes, source)
    notes = checked + notes
    shapes = infer_shapes(proto, input_shapes, source)
    graph = _import(proto)
    protected = _protected(graph, options)
    analysis = analyze(graph, shapes, protected.__contains__ if options.keep else None)
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
    # later (reconstruction) takes the same share.
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
    prep = _Prepared(proto, source, size, input_shapes, notes, shapes, graph, analysis, sess or loaded,
                     calibration if count else None, check, count, count_feeds=count_feeds)
    _rank_by_data(prep, options, samples)
    return prep


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


def _measure(prep: _Prepared, model: onnx.ModelProto, shapes: dict, size: int, what: str):
    """metrics.measure of the pruned ``model``, with the shapes inference left open from a run on
    the counting run's inputs."""
    if prep.count_feeds is not None:
        _, tensors = verify.open_layer_shapes(model, shapes)
        shapes = {**shapes, **verify.concrete_shapes(model, tensors, prep.count_feeds, what)}
    return measure(prep.graph, shapes, size)


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


def _rank_by_data(prep: _Prepared, options: PruneOptions, samples) -> None:
    """Data importance (:mod:`.data_importance`) on the calibration share of the samples."""
    if options.round_to == "auto":
        prep.notes.append(resolve_round_to("auto")[1])
    prep.importance = _importance(prep.analysis, options)
    if prep.importance != "data":
        prep.notes.append("importance: gamma (|BN scale| ranks the channels)")
        return
    if prep.calibration is None and samples is not None:
        prep.calibration, prep.check, note = data.split(samples, options.calibration_samples)
        prep.notes.extend([note] if note else [])
    if prep.calibration is not None:
        feeds, described = prep.calibration.arrays, prep.calibration.describe()
    else:
        feeds, _ = verify.make_inputs(prep.model, prep.input_shapes, None, options.seed, calibration=True)
        described = f"{ort_runtime.count(feeds)} seeded N(0,1) samples (pass --data: random inputs rank channels poorly)"
    prep.calibration_count = max(prep.calibration_count, ort_runtime.count(feeds))
    ranking = data_importance(prep.analysis, prep.model, feeds)
    prep.analysis.apply(ranking.scores)
    measured, ranked = ranking.measured, ranking.ranked
    if ranked:
        prep.notes.append(f"{ranked} channel group{'s' if ranked > 1 else ''} without a BatchNorm scale "
                          "(left alone with gamma) ranked by data too")
    prep.notes.append(f"importance: data (each channel's share of the output variance at its {measured} consumers, "
                      f"on {described})")


def _nothing_to_prune(prep: _Prepared) -> BnSlimError:
    ops = {n.op for n in prep.graph.nodes}
    if not prep.analysis.spaces:
        return BnSlimError(f"{prep.source}: no Conv or Gemm layer with a constant weight; nothing to prune")
    if "BatchNormalization" not in ops and not any(s.sources for s in prep.analysis.spaces):
        return BnSlimError(f"{prep.source}: no BatchNormalization node and no layer whose BN scale can be recovered "
                           f"(a Conv/Gemm with a bias); pass --data (a few hundred samples) to rank its channels by "
                           f"their measured cost, or, if it was trained with BN, re-export with BN kept: {KEEP_BN_FLAGS}")
    reasons = sorted({s.blocked[0] for s in prep.analysis.roots() if s.blocked and s.producers})
    return BnSlimError(f"{prep.source}: every BN-scaled channel group is blocked, e.g. {reasons[0] if reasons else 'unknown'}; "
                       "run `onnx-bnslim inspect` for the full list")


def inspect(model: onnx.ModelProto | str | os.PathLike, ratio: float | None = None,
            options: PruneOptions | None = None) -> InspectResult:
    """The channel spaces of a model, their importance statistics, and why any are blocked.

    With ``ratio`` (or ``options.threshold``), also how many channels each space would lose.
    """
    options = options or PruneOptions()
    prep = _prepare(model, options, strict=False)  # an invalid input is a note here, an error in prune
    plan = None
    if ratio is not None or options.threshold is not None:
        if ratio is not None:
            options = PruneOptions(**{**asdict(options), "ratio": ratio, "threshold": None})
        options.validate()
        plan = select(prep.analysis, options)
    return InspectResult(describe_spaces(prep.analysis, plan), prep.notes, ratio)


def prune(model: onnx.ModelProto | str | os.PathLike, options: PruneOptions | None = None, **kwargs) -> PruneResult:
    """Remove the least important channels of ``model`` and prove the result with onnxruntime.

    ``model`` is a path or an ``onnx.ModelProto`` (never modified). Options come as a
    :class:`PruneOptions` or as its fields by keyword: ``prune("m.onnx", ratio=0.5)``.
    Raises :class:`BnSlimError` when the model cannot be pruned or the check fails.
    """
    if options is not None and kwargs:
        raise TypeError("prune() takes options=PruneOptions(...) or its fields as keywords, not both")
    options = options or PruneOptions(**kwargs)
    options.validate()
    given = _options_given(options, kwargs)
    result, prep = _prune_once(model, options, given)
    found = collapse.of_report(result.report)
    if found is not None:
        result, prep = _attempts(model, options, given, result, prep, found)
        if not found.resolved:
            log.warning("%s", found.message())
    _raise_failed_gate(result)
    if options.probe and result.report.removed_channels:  # nothing removed: the same model, nothing to time
        if result.fp32_model is None:
            result = _never_slower(model, options, given, result, prep)
        else:  # the slim FP32 model timed for the record; the deployed pair acts: slim + INT8 against INT8 alone
            found = probe(prep.model, result.fp32_model, probe_inputs(prep.model, prep.input_shapes,
                                                                      samples=_user_samples(prep)), threads=options.threads)
            result.report.probe = found.to_dict()
            result.report.notes.append(found.summary())
            result = _probe_int8(model, prep, options, result)
    return result


def _raise_failed_gate(result: PruneResult) -> None:
    """A gate (--max-error, --min-cosine, ...) the kept result fails: CheckFailed, nothing written."""
    report = result.report
    verification = report.verification
    if verification is None or not verification.failed:
        return
    int8_steps = (report.quantization or {}).get("steps") if result.fp32_model is not None else None
    what = f"{report.model} (pruned" + (" + INT8)" if result.fp32_model is not None else ")")
    steps = "" if not int8_steps else \
        " (" + "; ".join(f"{k}: cosine {m['cosine']:.5f}" for k, m in int8_steps.items()) + ")"
    raise CheckFailed(f"{what}: the check failed: {verification.failed}{steps}; nothing was written. "
                      "Lower --ratio or relax the gate", report)


def _never_slower(model, options: PruneOptions, given: dict, result: PruneResult, prep: _Prepared) -> PruneResult:
    """The probe (:func:`onnxslim_bn.app.bench.probe`): time the pruned model beside the original in
    onnxruntime; when it is not faster, prune again keeping the layers the probe blames whole,
    then with widths on the machine's block, re-probe each, and keep the fastest candidate.
    Only when none is faster is the pruned model written as it is, with a warning naming what
    was tried."""
    feeds = probe_inputs(prep.model, prep.input_shapes, samples=_user_samples(prep))
    found = probe(prep.model, result.model, feeds, threads=options.threads)
    best, best_found, tried = result, found, []
    slower = found.pruned_ms > found.original_ms * (1 + PROBE_NOISE)
    for label, alternative in (_probe_alternatives(options, given, found, prep, result) if slower else []):
        try:
            candidate, _ = _prune_once(model, alternative, given)
        except BnSlimError as err:  # a gate of the check, or nothing left to prune
            tried.append(f"{label} (not possible: {str(err).split(': ', 1)[-1][:80]})")
            continue
        if candidate.report.verification is not None and candidate.report.verification.failed:
            tried.append(f"{label} (fails the check: {candidate.report.verification.failed})")
            continue
        if not candidate.report.removed_channels:
            tried.append(f"{label} (removes nothing)")
            continue
        again = probe(prep.model, candidate.model, feeds, threads=options.threads)
        tried.append(f"{label} ({again.speedup:.2f}x)")
        if again.pruned_ms / again.original_ms < (best_found.pruned_ms / best_found.original_ms) * (1 - PROBE_NOISE):
            best, best_found = candidate, again
        if best_found.faster:
            break
    report = best.report
    report.probe = {**best_found.to_dict(), "tried": tried}
    if best is not result:
        report.notes.append(f"probe: the first cut ran {found.speedup:.2f}x in onnxruntime; "
                            f"tried {', '.join(tried)}; kept the fastest")
    report.notes.append(best_found.summary())
    if not best_found.faster:
        log.warning("%s%s", best_found.message(), f"; also tried: {', '.join(tried)}" if tried else "")
    return best


# Timed side by side on these shared machines, two copies of one model differ by a few percent:
# the probe calls a cut slower, and a candidate faster than another, only beyond this fraction.
PROBE_NOISE = 0.05


def _probe_alternatives(options: PruneOptions, given: dict, found, prep: _Prepared,
                        result: PruneResult) -> list[tuple[str, PruneOptions]]:
    """Other cuts to try when the probe finds the pruned model slower (see :func:`_never_slower`):
    the layers it blames kept whole; widths on the machine's block, unless the user set a block."""
    out = []
    layers = {n.name for n in prep.model.graph.node if n.op_type in LAYER_OPS}
    blamed = [b.node for b in found.blame if b.node in layers]
    if blamed:
        shown = ", ".join(blamed[:3]) + (f" and {len(blamed) - 3} more" if len(blamed) > 3 else "")
        out.append((f"keeping {shown} whole", replace(options, keep=[*options.keep, *map(glob.escape, blamed)])))
    machine = resolve_round_to("auto")[0]
    used = (result.report.selection.get("budget") or {}).get("round_to", options.block())
    if "round_to" not in given and used != machine:
        out.append((f"widths on multiples of {machine}", replace(options, round_to=machine)))
    return out


# what a collapsed budget run tries instead, in this order (each a whole run; the first that does
# not collapse ends the search, else the best of them is kept)
ATTEMPTS = ("keep the layer that lost the largest share", "the other importance", "half the per-layer cut")


def _attempts(model, options: PruneOptions, given: dict, result: PruneResult, prep: _Prepared,
              found: collapse.Collapse) -> tuple[PruneResult, _Prepared]:
    """A collapsed result (:mod:`.collapse`): a budget run (--target-macs / --target-params) tries
    the :data:`ATTEMPTS` that its options leave open and keeps the best one by the check's
    agreement, then cosine; every result, the chosen one too, is recorded in ``found``, which
    the report carries (``report.collapse``). Only a result that is not collapsed ends the search."""
    def entry(what: str, r: PruneResult) -> dict:
        v = r.report.verification
        return {"what": what, "agreement": v.top1_agreement, "cosine": v.cosine,
                "collapsed": collapse.of_report(r.report) is not None, "chosen": False}

    found.attempts.append(entry("as asked", result))
    best, best_prep, chosen = result, prep, 0
    budget = options.target_macs is not None or options.target_params is not None
    for what, alternative in (_collapse_alternatives(options, result) if budget else ()):
        try:
            other, other_prep = _prune_once(model, alternative, given)
        except BnSlimError as exc:
            found.attempts.append({"what": what, "failed": str(exc).splitlines()[0][:200], "chosen": False})
            continue
        found.attempts.append(entry(what, other))
        if (other.report.selection.get("budget") or {}).get("unreachable") and \
                not (result.report.selection.get("budget") or {}).get("unreachable"):
            continue  # it misses the budget the first run met
        if collapse.quality(other.report) > collapse.quality(best.report):
            best, best_prep, chosen = other, other_prep, len(found.attempts) - 1
            if not found.attempts[-1]["collapsed"]:
                found.resolved = True
                break
    found.attempts[chosen]["chosen"] = True
    if best is not result:  # the numbers of the result written
        v = best.report.verification
        written = collapse.of_report(best.report)
        found.agreement, found.cosine = v.top1_agreement, v.cosine
        if written is not None:
            found.cut, found.allowed_disagreement, found.allowed_cosine_loss = \
                written.cut, written.allowed_disagreement, written.allowed_cosine_loss
    best.report.collapse = found
    if best is not result:
        tried = ", ".join(f"{a['what']}: " + (f"agreement {a['agreement']:.1%}" if a.get("agreement") is not None else
                                             f"cosine {a['cosine']:.4f}" if "cosine" in a else "failed")
                          for a in found.attempts)
        best.report.notes.append(f"the run as asked collapsed; written instead: {found.attempts[chosen]['what']} "
                                 f"(tried {tried})")
    return best, best_prep


def _collapse_alternatives(options: PruneOptions, result: PruneResult):
    """(label, options) of the :data:`ATTEMPTS` the options leave open: the layer that lost the
    largest share of its channels kept whole (--keep), the other importance (only when
    --importance is auto and --data is given), half of --max-layer-ratio."""
    spaces = [s for s in result.report.spaces if s.kept < s.channels and s.producers]
    if spaces:
        culprit = max(spaces, key=lambda s: ((s.channels - s.kept) / s.channels, s.channels - s.kept))
        pattern = re.sub(r"([\[\]*?])", r"[\1]", culprit.producers[0])
        yield (f"{ATTEMPTS[0]} ({culprit.producers[0]}, {culprit.channels - culprit.kept} of {culprit.channels} "
               "channels removed) whole", replace(options, keep=[*options.keep, pattern]))
    used = result.report.options.get("importance")
    if options.importance == "auto" and options.data is not None and used in ("gamma", "data"):
        other = "data" if used == "gamma" else "gamma"
        yield f"{ATTEMPTS[1]} ({other})", replace(options, importance=other)
    yield (f"{ATTEMPTS[2]} (--max-layer-ratio {options.max_layer_ratio / 2:g})",
           replace(options, max_layer_ratio=options.max_layer_ratio / 2))


def _prune_once(model, options: PruneOptions, given: dict) -> tuple[PruneResult, _Prepared]:
    """One run: prepare, select, cut, compensate, quantize and check; the gates' failure is recorded
    in the report's check, not raised (:func:`prune` raises it for the result it keeps)."""
    clock = time.perf_counter()
    curves, target, timed = None, options.target_latency, None
    for attempt in range(3 if target is not None else 1):  # --target-latency: timed, tightened when missed
        prep = _prepare(model, options)
        if not prep.analysis.prunable():
            raise _nothing_to_prune(prep)
        if target is not None and curves is None:
            curves = _latency_table(prep, options)
        before = measure(prep.graph, {**prep.shapes, **prep.analysis.counted_shapes},
                         prep.size_bytes or weight_bytes(prep.model))
        plan: Plan = select(prep.analysis, replace(options, target_latency=target) if target else options, curves)
        prep.notes.extend(plan.notes)
        blind = resolution_note(curves) if target is not None and curves else None
        if blind:  # below the timer's resolution: those layers were costed by MACs
            prep.notes.append(blind)
            plan.budget["macs_proxy_layers"] = sorted(n for n, c in curves.items() if not c.resolved)
        # a refit keeps the border maps of removed constants where they make it more exact (reconstruct.py)
        stats = apply(prep.analysis, plan, options.exact_borders or _compensation(options) == "reconstruct")
        resolved = _options_resolved(options, prep)
        resolved["round_to"] = plan.budget.get("round_to", resolved["round_to"])  # a budget may need a finer block
        pruned = _export(prep, run_metadata(resolved), options.allow_growth)
        seconds = {"prune": time.perf_counter() - clock}
        reconstruction = None
        if _compensation(options) == "reconstruct":
            clock = time.perf_counter()
            pruned, reconstruction = _reconstruct(prep, pruned, options, stats)
            seconds["reconstruct"] = time.perf_counter() - clock
        if target is None:
            break
        timed = _time_latency(prep, pruned, options)
        plan.budget.update(target=options.target_latency, aimed=target, measured=timed[1] / timed[0])
        prep.notes.append(f"--target-latency {options.target_latency:g} on {options.runtime}, batch "
                          f"{options.latency_batch}: {timed[0]:.3f} -> {timed[1]:.3f} ms measured "
                          f"({timed[1] / timed[0]:.1%}; the layer table predicted {plan.budget['reached']:.1%}), "
                          f"attempt {attempt + 1}")
        if timed[1] / timed[0] <= options.target_latency * 1.03:
            plan.budget["met"] = True  # as measured: never "out of reach", whatever the table predicted
            break
        if curves and not any(c.resolved for c in curves.values()):  # nothing to aim better with
            prep.notes.append(f"--target-latency {options.target_latency:g} missed as measured, and not tightened: the "
                              "layer table sees no layer's width in the time, so a lower aim would only remove more "
                              "MACs on noise; this model's time is mostly outside its layers (use --target-macs)")
            break
        target = max(0.02, target * options.target_latency / (timed[1] / timed[0]))  # aim lower and try again

    quantized = None
    if options.quantize:  # INT8 after pruning and compensation: the deployed model (quantize.py)
        quantized = _quantize(prep, pruned, options)
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
        model=prep.source, output=None, options=resolved, options_given=given,
        before=before, after=_measure(prep, pruned, pruned_shapes, weight_bytes(deployed), f"{prep.source} (pruned)"),
        verification=verification, surgery=stats, spaces=describe_spaces(prep.analysis, plan),
        notes=prep.notes, seconds=seconds, chosen_channels=plan.chosen, selection=plan.summary())
    if quantized is not None:
        report.quantization = _quantization_report(prep, pruned, quantized, verification, feeds, outputs)
    found = collapse.of_report(report)
    if found is not None:
        report.collapse = found
    return PruneResult(deployed, report, feeds, outputs, reconstruction, pruned if quantized is not None else None), prep


def _probe_int8(model, prep: _Prepared, options: PruneOptions, result: PruneResult) -> PruneResult:
    """The probe for the deployed pair: INT8 alone (the original quantized on the same samples)
    against slim + INT8, at ``--latency-batch``. When slim + INT8 is not faster, the layers it
    blames are kept whole in a second run (--keep), that run is probed too, and the faster of
    the two slim + INT8 models is the result (the notes say which, with both times)."""
    try:
        # INT8 alone keeps the same nodes in FP32 as slim + INT8 (node names survive pruning): a fair pair
        alone, _ = int8.quantize_with_fallback(prep.model, prep.calibration.arrays, prep.source,
                                               verify.static_batch(prep.model), result.report.quantization["excluded_nodes"])
    except BnSlimError as exc:  # the original will not quantize: nothing to time slim + INT8 against
        result.report.notes.append(f"INT8 probe skipped: {exc}")
        return result
    feeds = probe_inputs(prep.model, prep.input_shapes, batch=options.latency_batch, samples=_user_samples(prep))
    found = probe(alone.model, result.model, feeds, threads=options.threads)
    _record_int8_probe(result.report, found, options.latency_batch)
    layers = {n.name for n in prep.model.graph.node if n.op_type in LAYER_OPS}
    # onnxruntime names a QDQ group it fused into one INT8 kernel after the layer: '<layer>_token_<n>'
    names = sorted({re.sub(r"_token_\d+$", "", b.node) for b in found.blame} & layers)
    if found.faster or not names:
        if not found.faster:
            log.warning("%s", result.report.quantization["probe"]["message"])
        return result
    try:
        again = prune(model, replace(options, keep=[*options.keep, *names], probe=False))
    except BnSlimError as exc:  # the gates or the budget refuse the second run: keep the first
        result.report.notes.append(f"INT8 probe: keeping {', '.join(names)} whole failed ({exc}); kept the first model")
        log.warning("%s", result.report.quantization["probe"]["message"])
        return result
    second = probe(alone.model, again.model, feeds, threads=options.threads)
    _record_int8_probe(again.report, second, options.latency_batch)
    line = (f"INT8 probe: slim + INT8 was not faster than INT8 alone ({found.original_ms:.3f} -> "
            f"{found.pruned_ms:.3f} ms); keeping {', '.join(names)} whole gave {second.pruned_ms:.3f} ms "
            f"(INT8 alone {second.original_ms:.3f} ms)")
    better = second.speedup > found.speedup
    chosen, other = (again, result) if better else (result, again)
    chosen.report.notes.append(line + ("; wrote that one" if better else "; kept the first, it was faster"))
    chosen.report.quantization["probe_retry"] = {"kept_whole": names, "first": found.to_dict(), "second": second.to_dict(),
                                                 "chose": "second" if better else "first"}
    if not (second if better else found).faster:
        log.warning("%s", chosen.report.quantization["probe"]["message"])
    return chosen


def _record_int8_probe(report: Report, found, batch: int) -> None:
    """The INT8 pair's probe in the report: its numbers, one note, and the warning's text."""
    summary = (f"INT8 probe (onnxruntime, batch {batch}): slim + INT8 ran "
               f"{'%.2fx faster than' % found.speedup if found.faster else 'at %.2fx the speed of' % found.speedup} "
               f"INT8 alone ({found.original_ms:.3f} -> "
               f"{found.pruned_ms:.3f} ms, {found.runs} alternating runs)")
    blamed = ", ".join(f"{b.node} ({b.original_ms:.3f} -> {b.pruned_ms:.3f} ms)" for b in found.blame[:3])
    message = (f"slim + INT8 is not faster than INT8 alone in onnxruntime ({found.original_ms:.3f} -> "
               f"{found.pruned_ms:.3f} ms)" + (f"; slower layers: {blamed}" if blamed else "")
               + "; try --round-to 32 or keep those layers (--keep)")
    report.quantization["probe"] = {**found.to_dict(), "batch": batch, "message": None if found.faster else message}
    report.notes.append(summary)


def _quantize(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions) -> int8.Quantized:
    """The pruned model in INT8, calibrated on the calibration share of the data (split from the
    check's here when no earlier stage split it); refused when the two cannot be kept apart."""
    if prep.check is None:
        raise BnSlimError(f"{prep.source}: {int8.NEEDS_DATA}")
    if prep.calibration is None:
        prep.calibration, prep.check, note = data.split(prep.check, options.calibration_samples)
        prep.calibration_count = prep.calibration.count
        prep.notes.extend([note] if note else [])
    if prep.calibration is prep.check:
        raise BnSlimError(f"{prep.source}: --quantize int8 calibrates on samples the check does not use, but "
                          f"{prep.check.source} has only {prep.check.count}; pass more samples (64 or more) or "
                          "--calibration-samples N to split them")
    quantized, found = int8.quantize_with_fallback(pruned, prep.calibration.arrays, f"{prep.source} (pruned)",
                                                   verify.static_batch(prep.model), options.int8_fp32)
    s = quantized.settings
    prep.notes.append(f"quantized to INT8 ({s.format}, {s.weights} per-channel weights, {s.activations} activations: "
                      f"{s.reason}) with {s.calibration} ranges on {prep.calibration.describe()}, "
                      f"in {quantized.seconds:.1f} s")
    if found is not None and found.chosen:
        prep.notes.append(f"kept in FP32, their quantization dominating the INT8 error: {', '.join(found.chosen)} "
                          f"(relative error against the FP32 model on {found.samples} calibration samples "
                          f"{found.error:.3g} -> {found.error_after:.3g})")
    quantized.sensitivity = found
    return quantized


def _quantization_report(prep: _Prepared, pruned: onnx.ModelProto, quantized: int8.Quantized, verification,
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


def _latency_table(prep: _Prepared, options: PruneOptions) -> dict:
    """The per-layer latency curves of the original on the target runtime (cached per machine)."""
    if options.runtime == "openvino":
        require_openvino("--runtime openvino")
    shapes = {**prep.shapes, **prep.analysis.counted_shapes}  # layers inference left open: as a run gave them
    curves = layer_latency_table(prep.model, shapes, runtime=options.runtime, batch=options.latency_batch,
                                 threads=options.threads)
    if not curves:
        ops = sorted({n.op for n in prep.analysis.nodes if any(n.name in s.producers for s in prep.analysis.prunable())})
        raise BnSlimError(f"{prep.source}: --target-latency times Conv, ConvTranspose and Gemm layers with a constant "
                          f"weight and a known input shape; this model's prunable layers ({', '.join(ops) or 'none'}) "
                          "give none to time: use --target-macs or --target-params instead")
    return curves


def _time_latency(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions) -> tuple[float, float]:
    """Original and pruned median ms on the target runtime, timed alternately."""
    feeds = probe_inputs(prep.model, prep.input_shapes, batch=options.latency_batch, samples=_user_samples(prep))
    return time_pair(prep.model, pruned, options.runtime, feeds, options.threads)


def _user_samples(prep: _Prepared) -> dict[str, np.ndarray] | None:
    """The --data samples the timing runs on (the check's share; a timing needs real values, not
    held-out ones), or None without data."""
    samples = prep.check if prep.check is not None else prep.calibration
    return None if samples is None else samples.arrays


def _compensation(options: PruneOptions) -> str:
    if options.compensation == "auto":
        return "reconstruct" if options.data is not None else "bias"
    return options.compensation


def _reconstruct(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions, stats):
    """Refit the layers whose inputs were pruned on the calibration share of the data (split
    from the check's here when no scale recovery split it already). Layers under --keep stay as
    they are; border maps stay where the user asked for them (--exact-borders) or where they
    make the refit more exact within the input's size."""
    if prep.check is None:
        raise BnSlimError(f"{prep.source}: --compensation reconstruct refits layers on calibration data; "
                          "pass --data (an .npz, .npy or a folder of images) or use --compensation bias")
    if prep.calibration is None:
        prep.calibration, prep.check, note = data.split(prep.check, options.calibration_samples)
        prep.calibration_count = prep.calibration.count
        prep.notes.extend([note] if note else [])
    refit, result = reconstruct(prep.model, pruned, prep.calibration.arrays, seed=options.seed,
                                frozen=_protected(prep.graph, options), keep_maps=options.exact_borders)
    stats.border_maps -= result.maps_dropped
    prep.notes.append(result.summary())
    if result.maps_too_large:
        prep.notes.append(f"reconstruction: {result.maps_too_large} border map{'s' if result.maps_too_large > 1 else ''} "
                          "(the exact correction where removed constants meet a conv's padding) left out: they would "
                          "make the model larger than the input; --exact-borders keeps them")
    for label, reason in result.skipped:
        prep.notes.append(f"reconstruction left {label} as bias folding made it: {reason}")
    return refit, result


def _export(prep: _Prepared, metadata: dict[str, str], allow_growth: bool = False) -> onnx.ModelProto:
    """The pruned graph as a model with the input's interface (inputs, outputs, IR, opsets,
    metadata), unique tensor names, and weights no larger than the input's (see interface)."""
    settle_copies(prep.graph)
    widened = restore_storage(prep.graph)  # fp16 weights behind a Cast stay fp16
    fix_tensor_names(prep.graph)
    origins = copy_origins(prep.graph)
    pruned = gs.export_onnx(prep.graph, do_type_check=False)
    original = prep.model
    pruned.ir_version = original.ir_version
    del pruned.opset_import[:]
    pruned.opset_import.extend(original.opset_import)
    pruned.producer_name, pruned.producer_version = original.producer_name, original.producer_version
    pruned.model_version, pruned.domain = original.model_version, original.domain
    pruned.doc_string = original.doc_string
    restore_interface(pruned, original, prep.graph)
    check_interface(original, pruned, prep.source)
    check_size(account(original, pruned, origins, widened), allow_growth, prep.source)
    try:  # annotate shapes from a weight-less copy: no second copy of the weights in memory
        inferred = onnx.shape_inference.infer_shapes(skeleton(pruned, None), strict_mode=True)
        known = {t.name for t in pruned.graph.initializer} | {t.name for t in pruned.graph.input}
        given = {v.name for v in pruned.graph.value_info}
        pruned.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
        _add_metadata(pruned, original, metadata, given)
        return pruned
    except onnx.shape_inference.InferenceError as exc:
        raise BnSlimError(f"{prep.source}: the pruned graph fails shape inference ({str(exc).splitlines()[0]}); "
                          "nothing was written. This is a bug in onnx-bnslim: please report it with the model") from exc


def _add_metadata(pruned: onnx.ModelProto, original: onnx.ModelProto, metadata: dict[str, str], given: set[str]) -> None:
    """The input's metadata_props, then this run's (an earlier run's keys, pruned again, give way):
    tool, version and options (report.run_metadata). When that would make the file larger than
    its input (a run that removed almost nothing), less is added: the options go first, then the
    rest of the record, then the shape annotations this run added (``value_info`` not in
    ``given``); the JSON report keeps the whole record either way."""
    limit = None if too_large_for_protobuf(original) else original.ByteSize()
    records = [metadata, {k: v for k, v in metadata.items() if k != "onnx-bnslim.options"}, {}, None]
    for record in records:
        if record is None:  # the last resort: the shape annotations this run added
            kept = [v for v in pruned.graph.value_info if v.name in given]
            del pruned.graph.value_info[:]
            pruned.graph.value_info.extend(kept)
            return
        del pruned.metadata_props[:]
        pruned.metadata_props.extend(p for p in original.metadata_props if p.key not in metadata)
        for key, value in record.items():
            pruned.metadata_props.add(key=key, value=value)
        if limit is None or too_large_for_protobuf(pruned) or pruned.ByteSize() <= limit:
            return


def _verify(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions, what: str | None = None):
    """The check (verify's module doc): checker, then both models in onnxruntime on the check's
    samples (the data's check share, else seeded N(0,1) samples), compared output by output and
    gated. A failed gate is recorded in ``failed``; :func:`prune` raises after building the report."""
    what = what or f"{prep.source} (pruned)"
    verify.check_model(pruned, what)
    batch = verify.static_batch(prep.model)
    notes = []
    if prep.check is not None:
        feeds, count = prep.check.arrays, prep.check.count
        apart = ", also used for calibration" if prep.calibration_count and prep.check is prep.calibration else \
            ", not used for calibration"
        described = f"{prep.check.describe()}{apart}"
        if count < verify.CHECK_SAMPLES:
            notes.append(f"the check ran on {count} samples only; pass at least {verify.CHECK_SAMPLES} for a check "
                         "that can tell a small agreement loss from chance")
    else:
        count = verify.check_sample_count(prep.model, options.check_samples)
        feeds = verify.random_inputs(prep.model, prep.input_shapes, options.seed, count, stream=1)
        described = f"{count} seeded N(0,1) samples, not used for calibration"
    notes.extend(n for n in [verify.padding_note(count, batch, "check")] if n)
    names = [o.name for o in prep.model.graph.output]
    try:
        before = ort_runtime.run(prep.session or ort_runtime.session(prep.model, prep.source), feeds, batch, names)
    except Exception as exc:  # onnxruntime raises its own unexported exception types
        if isinstance(exc, BnSlimError) or prep.check is not None:
            raise
        raise BnSlimError(f"{prep.source}: onnxruntime fails on the check's seeded N(0,1) inputs "
                          f"({str(exc).splitlines()[0][:200]}): this model needs real inputs; pass them with --data") from exc
    padded = ort_runtime.pad(feeds, batch)  # whole batches, for the OpenVINO check too
    after_padded = ort_runtime.run(ort_runtime.session(pruned, what, optimized=int8.is_quantized(pruned)),
                                   padded, batch, names)
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


def _options_given(options: PruneOptions, kwargs: dict) -> dict:
    """The options as the caller gave them: the keywords, or the fields set away from their defaults."""
    given = dict(kwargs) if kwargs else {k: getattr(options, k) for k in asdict(PruneOptions())
                                        if not _same(getattr(options, k), getattr(PruneOptions(), k))}
    if "data" in given:  # arrays in memory are described, not copied into the report
        given["data"] = data.describe_option(given["data"])
    return given


def _same(a, b) -> bool:
    """Equal option values; arrays (in-memory data) never equal a default."""
    arrays = isinstance(a, np.ndarray) or (isinstance(a, dict) and any(isinstance(v, np.ndarray) for v in a.values()))
    return not arrays and a == b


def _options_resolved(options: PruneOptions, prep: _Prepared) -> dict:
    """Every option as the run used it: defaults filled in, input shapes fixed, --keep resolved to layers."""
    out = asdict(options) if options.data is None or isinstance(options.data, (str, os.PathLike)) else \
        asdict(replace(options, data=None))
    out["data"] = data.describe_option(options.data)
    out["input_shapes"] = {k: list(v) for k, v in prep.input_shapes.items()}
    out["round_to"] = options.block()
    out["importance"] = prep.importance
    out["compensation"] = _compensation(options)
    layers = {name for s in prep.analysis.spaces for name in s.producers}
    out["protected_layers"] = sorted(_protected(prep.graph, options) & layers)
    return out


def _protected(graph: gs.Graph, options: PruneOptions) -> set[str]:
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


__all__ = ["PruneResult", "InspectResult", "prune", "inspect", "to_openvino"]

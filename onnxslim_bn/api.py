"""The Python API: ``prune`` and ``inspect``. The command line is a thin layer over these."""

from __future__ import annotations

import difflib
import logging
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import collapse, data, verify
from .analysis import Analysis, analyze
from .data import Samples
from .errors import BnSlimError, CheckFailed
from .fold import fold_constants, split_sequences
from .importance import add_data_scores, candidates
from .metrics import measure, weight_bytes
from .edits import fix_tensor_names
from .interface import (account, check_interface, check_size, copy_origins, fix_node_names, fix_proto_node_names,
                        needs_node_names, remember_node_metadata, restore_interface, settle_copies)
from .model_io import check_input, load_model_and_files
from .openvino_ir import OpenVinoResult, export_ir
from .openvino_ir import require as require_openvino
from .data_importance import close_unmeasured, data_importance, open_unscaled
from .bench import probe, probe_inputs, time_pair
from .hardware import resolve_round_to
from .latency import layer_latency_table
from .plan import dead_level, Plan, PruneOptions, select
from .reconstruct import ReconstructionReport, reconstruct
from .report import Report, SpaceReport, describe_spaces, run_metadata, weight_name
from .shapes import infer_shapes, resolve_input_shapes, skeleton
from .surgery import apply

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
    # the loaded original and its fixed input shapes, while prune() still needs them (the probe)
    _original: onnx.ModelProto | None = field(default=None, repr=False)
    _input_shapes: dict = field(default_factory=dict, repr=False)


def to_openvino(result: PruneResult, out_dir: str | os.PathLike, name: str = "model", fp16: bool = False) -> OpenVinoResult:
    """Write the pruned model as OpenVINO IR and check OpenVINO against onnxruntime on the
    inputs of the pruned model's check. Adds the outcome to ``result.report``."""
    if not result.check_inputs:
        raise BnSlimError("the OpenVINO check needs the onnxruntime check's inputs: prune with verify=True")
    ir = export_ir(result.model, out_dir, name, fp16, result.check_inputs, result.check_outputs)
    result.report.openvino = ir
    return ir


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
            session = verify.session(proto, f"{source} (the input model)")
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
    calibration = check = samples
    found, sess, count = candidates(analysis), None, 0
    # Calibration: activation statistics of the original (scale recovery). With data, it takes its
    # share of the samples (data.split) and the check the rest; a stage that needs calibration
    # later (reconstruction) takes the same share.
    if found:  # one session of the original serves the calibration and, later, the check
        names = [t.name for _, t, _ in found]
        loaded = None  # the input's first session: this one (with the scale tensors as outputs) replaces it
        sess = verify.session(proto, source, extra_outputs=names)
        if samples is not None:
            calibration, check, split_note = data.split(samples, options.calibration_samples)
            notes.extend([split_note] if split_note else [])
            feeds, described = calibration.arrays, calibration.describe()
        else:
            feeds, described = verify.make_inputs(proto, input_shapes, None, options.seed, calibration=True)
            described = f"{verify.count(feeds)} seeded N(0,1) samples"
        count = verify.count(feeds)
        add_data_scores(analysis, found, verify.run(sess, feeds, verify.static_batch(proto), names))
        notes.append(f"no BatchNormalization for some layers: their BN scale was recovered from activation statistics "
                     f"on {described}" + ("" if samples is not None else "; pass --data with real inputs for a closer estimate"))
    prep = _Prepared(proto, source, size, input_shapes, notes, shapes, graph, analysis, sess or loaded,
                     calibration if count else None, check, count)
    _rank_by_data(prep, options, samples)
    return prep


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
        described = f"{verify.count(feeds)} seeded N(0,1) samples (pass --data: random inputs rank channels poorly)"
    prep.calibration_count = max(prep.calibration_count, verify.count(feeds))
    opened = open_unscaled(prep.analysis)
    measured = data_importance(prep.analysis, prep.model, feeds)
    ranked = close_unmeasured(prep.analysis, opened) if opened else 0
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
    result = _prune_once(model, options, given)
    report = result.report
    found = collapse.of_report(report)
    if found is not None:
        result = _attempts(model, options, given, result, found)
        report = result.report
        if not found.resolved:
            log.warning("%s", found.message())
    verification = report.verification
    if verification is not None and verification.failed:
        raise CheckFailed(f"{report.model} (pruned): the check failed: {verification.failed}; nothing was written. "
                          "Lower --ratio or relax the gate", report)
    if options.probe and report.removed_channels:  # nothing removed: the same model, nothing to time
        timed = probe(result._original, result.model, probe_inputs(result._original, result._input_shapes),
                      threads=options.threads)
        report.probe = timed.to_dict()
        report.notes.append(timed.summary())
        if not timed.faster:
            log.warning("%s", timed.message())
    result._original = None
    return result


# what a collapsed budget run tries instead, in this order (each a whole run; the first that does
# not collapse ends the search, else the best of them is kept)
ATTEMPTS = ("keep the layer that lost the largest share", "the other importance", "half the per-layer cut")


def _attempts(model, options: PruneOptions, given: dict, result: PruneResult, found: collapse.Collapse) -> PruneResult:
    """A collapsed result (:mod:`.collapse`): a budget run (--target-macs / --target-params) tries
    the :data:`ATTEMPTS` that its options leave open and keeps the best one by the check's
    agreement, then cosine; every result, the chosen one too, is recorded in ``found``, which
    the report carries (``report.collapse``). Only a result that is not collapsed ends the search."""
    def entry(what: str, r: PruneResult) -> dict:
        v = r.report.verification
        return {"what": what, "agreement": v.top1_agreement, "cosine": v.cosine,
                "collapsed": collapse.of_report(r.report) is not None, "chosen": False}

    found.attempts.append(entry("as asked", result))
    best, chosen = result, 0
    budget = options.target_macs is not None or options.target_params is not None
    for what, alternative in (_alternatives(options, result) if budget else ()):
        try:
            other = _prune_once(model, alternative, given)
        except BnSlimError as exc:
            found.attempts.append({"what": what, "failed": str(exc).splitlines()[0][:200], "chosen": False})
            continue
        found.attempts.append(entry(what, other))
        if (other.report.selection.get("budget") or {}).get("unreachable") and \
                not (result.report.selection.get("budget") or {}).get("unreachable"):
            continue  # it misses the budget the first run met
        if collapse.quality(other.report) > collapse.quality(best.report):
            best, chosen = other, len(found.attempts) - 1
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
    return best


def _alternatives(options: PruneOptions, result: PruneResult):
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


def _prune_once(model, options: PruneOptions, given: dict) -> PruneResult:
    """One run: prepare, select, cut, compensate and check; the gates' failure is recorded in
    the report's check, not raised (:func:`prune` raises it for the result it keeps)."""
    clock = time.perf_counter()
    curves, target, timed = None, options.target_latency, None
    for attempt in range(3 if target is not None else 1):  # --target-latency: timed, tightened when missed
        prep = _prepare(model, options)
        if not prep.analysis.prunable():
            raise _nothing_to_prune(prep)
        if target is not None and curves is None:
            curves = _latency_table(prep, options)
        before = measure(prep.graph, prep.shapes, prep.size_bytes or weight_bytes(prep.model))
        plan: Plan = select(prep.analysis, replace(options, target_latency=target) if target else options, curves)
        prep.notes.extend(plan.notes)
        stats = apply(prep.analysis, plan, options.exact_borders)
        resolved = _options_resolved(options, prep)
        resolved["round_to"] = plan.budget.get("round_to", resolved["round_to"])  # a budget may need a finer block
        pruned = _export(prep, run_metadata(resolved), options.allow_growth)
        seconds = {"prune": time.perf_counter() - clock}
        reconstruction = None
        if _compensation(options) == "reconstruct":
            clock = time.perf_counter()
            pruned, reconstruction = _reconstruct(prep, pruned, options)
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
            break
        target = max(0.02, target * options.target_latency / (timed[1] / timed[0]))  # aim lower and try again

    clock = time.perf_counter()
    pruned_shapes = infer_shapes(pruned, prep.input_shapes, "the pruned model")
    verification, feeds, outputs = None, {}, []
    if options.verify:
        verification, feeds, outputs = _verify(prep, pruned, options)
    else:  # the checker runs even without the onnxruntime comparison
        verify.check_model(pruned, f"{prep.source} (pruned)")
    seconds["verify"] = time.perf_counter() - clock
    report = Report(
        model=prep.source, output=None, options=resolved, options_given=given,
        before=before, after=measure(prep.graph, pruned_shapes, weight_bytes(pruned)),
        verification=verification, surgery=stats, spaces=describe_spaces(prep.analysis, plan),
        notes=prep.notes, seconds=seconds, chosen_channels=plan.chosen, selection=plan.summary())
    found = collapse.of_report(report)
    if found is not None:
        report.collapse = found
    return PruneResult(pruned, report, feeds, outputs, reconstruction, prep.model, prep.input_shapes)


def _latency_table(prep: _Prepared, options: PruneOptions) -> dict:
    """The per-layer latency curves of the original on the target runtime (cached per machine)."""
    if options.runtime == "openvino":
        require_openvino("--runtime openvino")
    return layer_latency_table(prep.model, prep.shapes, runtime=options.runtime, batch=options.latency_batch,
                               threads=options.threads)


def _time_latency(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions) -> tuple[float, float]:
    """Original and pruned median ms on the target runtime, timed alternately."""
    feeds = probe_inputs(prep.model, prep.input_shapes, batch=options.latency_batch)
    return time_pair(prep.model, pruned, options.runtime, feeds, options.threads)


def _compensation(options: PruneOptions) -> str:
    if options.compensation == "auto":
        return "reconstruct" if options.data is not None else "bias"
    return options.compensation


def _reconstruct(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions):
    """Refit the layers whose inputs were pruned on the calibration share of the data (split
    from the check's here when no scale recovery split it already)."""
    if prep.check is None:
        raise BnSlimError(f"{prep.source}: --compensation reconstruct refits layers on calibration data; "
                          "pass --data (an .npz, .npy or a folder of images) or use --compensation bias")
    if prep.calibration is None:
        prep.calibration, prep.check, note = data.split(prep.check, options.calibration_samples)
        prep.calibration_count = prep.calibration.count
        prep.notes.extend([note] if note else [])
    refit, result = reconstruct(prep.model, pruned, prep.calibration.arrays, seed=options.seed)
    prep.notes.append(result.summary())
    for label, reason in result.skipped:
        prep.notes.append(f"reconstruction left {label} as bias folding made it: {reason}")
    return refit, result


def _export(prep: _Prepared, metadata: dict[str, str], allow_growth: bool = False) -> onnx.ModelProto:
    """The pruned graph as a model with the input's interface (inputs, outputs, IR, opsets,
    metadata), unique tensor names, and weights no larger than the input's (see interface)."""
    settle_copies(prep.graph)
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
    del pruned.metadata_props[:]  # the input's, but an earlier run's keys (pruned again) give way to this run's
    pruned.metadata_props.extend(p for p in original.metadata_props if p.key not in metadata)
    for key, value in metadata.items():  # what was done: tool, version, options (report.run_metadata)
        pruned.metadata_props.add(key=key, value=value)
    restore_interface(pruned, original, prep.graph)
    check_interface(original, pruned, prep.source)
    check_size(account(original, pruned, origins), allow_growth, prep.source)
    try:  # annotate shapes from a weight-less copy: no second copy of the weights in memory
        inferred = onnx.shape_inference.infer_shapes(skeleton(pruned, None), strict_mode=True)
        known = {t.name for t in pruned.graph.initializer} | {t.name for t in pruned.graph.input}
        pruned.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
        return pruned
    except onnx.shape_inference.InferenceError as exc:
        raise BnSlimError(f"{prep.source}: the pruned graph fails shape inference ({str(exc).splitlines()[0]}); "
                          "nothing was written. This is a bug in onnx-bnslim: please report it with the model") from exc


def _verify(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions):
    """The check (verify's module doc): checker, then both models in onnxruntime on the check's
    samples (the data's check share, else seeded N(0,1) samples), compared output by output and
    gated. A failed gate is recorded in ``failed``; :func:`prune` raises after building the report."""
    what = f"{prep.source} (pruned)"
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
    before = verify.run(prep.session or verify.session(prep.model, prep.source), feeds, batch, names)
    padded = verify.pad(feeds, batch)  # whole batches, for the OpenVINO check too
    after_padded = verify.run(verify.session(pruned, what), padded, batch, names)
    after = verify.first_samples(after_padded, count, verify.count(padded))
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

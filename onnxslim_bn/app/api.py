"""The Python API: ``prune`` and ``inspect``. The command line is a thin layer over these."""

from __future__ import annotations

import glob
import logging
import math
import os
import re
import time
from dataclasses import asdict, dataclass, field, replace

import numpy as np
import onnx

from ..errors import BnSlimError, CheckFailed
from ..hardware import resolve_round_to
from ..ir import data
from ..ir.interface import drop_given_names
from ..ir.model_io import model_bytes
from ..ir.openvino_ir import OpenVinoResult, export_ir
from ..ir.openvino_ir import require as require_openvino
from ..ir.values import restored
from ..ir.weights import LAYER_OPS
from ..options import PruneOptions
from ..passes import collapse, verify
from ..passes import openvino_int8 as nncf_int8
from ..passes import quantize as int8
from ..passes.latency import layer_latency_table
from ..passes.reconstruct import ReconstructionReport
from ..passes.select import select
from .bench import probe, probe_inputs, time_pair
from .noise import rank
from .pipeline import Cut, Pipeline, Prepared, cut, finish, prepare
from .report import Report, SpaceReport, describe_spaces

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
    # with --quantize: the calibration share of --data (the NNCF IR calibrates on it too)
    calibration_inputs: dict[str, np.ndarray] = field(default_factory=dict)
    # with the check: the FP32 original's outputs on the check's samples (the first
    # ``report.verification.samples`` of ``check_inputs``)
    reference_outputs: list[np.ndarray] = field(default_factory=list)


def to_openvino(result: PruneResult, out_dir: str | os.PathLike, name: str = "model", fp16: bool = False,
                int8_route: str = "auto") -> OpenVinoResult:
    """Write the pruned model as OpenVINO IR and check it on the inputs of the pruned model's
    check. Adds the outcome to ``result.report``.

    FP32 (``fp16``: FP16 weights): OpenVINO reads the pruned model; checked against onnxruntime.
    INT8 (a ``quantize="int8"`` result), by ``int8_route``: "nncf" quantizes the pruned FP32 model with
    NNCF in OpenVINO (:mod:`onnxslim_bn.passes.openvino_int8`), checked against the FP32
    original; "qdq" has OpenVINO read the onnxruntime INT8 model, checked against onnxruntime;
    "auto" is "nncf" when nncf is installed, else "qdq" with a note saying so."""
    if not result.check_inputs:
        raise BnSlimError("the OpenVINO check needs the onnxruntime check's inputs: prune with verify=True")
    if int8_route not in nncf_int8.ROUTES:
        raise BnSlimError(f"--openvino-int8 {int8_route!r}: choose {', '.join(nncf_int8.ROUTES)}")
    route = _int8_route(result, int8_route)
    if route == "nncf":
        quantization = result.report.quantization
        verification = result.report.verification
        ir = nncf_int8.export_int8_ir(
            result.fp32_model, out_dir, name, fp16, result.calibration_inputs, result.check_inputs,
            result.reference_outputs, verification.samples, verification.inputs,
            nncf_int8.int8_tolerance(quantization["steps"]["total"]["max_rel_diff"], fp16), result.report.options,
            result.report.model, verify.static_batch(result.fp32_model), quantization["excluded_nodes"])
        result.report.notes.append(_nncf_note(ir))
    else:
        ir = export_ir(result.model, out_dir, name, fp16, result.check_inputs, result.check_outputs,
                       _int8_ir_tolerance(result.report.quantization, fp16))
        if route == "qdq":
            ir = replace(ir, route="qdq")
    result.report.openvino = ir
    return ir


def _int8_route(result: PruneResult, wanted: str) -> str | None:
    """The INT8 IR's route (:func:`to_openvino`), or None for an FP32 result; the fallback's note."""
    if result.fp32_model is None:
        if wanted != "auto":
            raise BnSlimError(f"--openvino-int8 {wanted} applies to an INT8 result: add --quantize int8")
        return None
    if wanted == "nncf":
        nncf_int8.require("--openvino-int8 nncf")
    if wanted == "qdq" or not nncf_int8.available():
        if wanted == "auto":
            result.report.notes.append(nncf_int8.FALLBACK_NOTE)
        return "qdq"
    if not result.calibration_inputs or not result.reference_outputs:
        raise BnSlimError("NNCF's INT8 IR needs the run's calibration samples and the original's outputs on the "
                          "check's: prune with quantize='int8', data=... and verify=True")
    return "nncf"


def _nncf_note(ir: OpenVinoResult) -> str:
    q, c = ir.quantizer, ir.check
    agreement = "" if c["top1_agreement"] is None else f"top-1 agreement {c['top1_agreement']:.2%}, "
    return (f"OpenVINO INT8 IR by NNCF {q['version']} (preset {q['preset']}, target {q['target_device']}, overflow fix "
            f"{q['overflow_fix']}) on the {q['calibration_samples']} calibration samples, in {q['seconds']:.1f} s; "
            f"against the FP32 original on {c['samples']} check samples (OpenVINO in FP32 precision): {agreement}"
            f"cosine {c['cosine']:.5f}, max relative diff {c['max_rel_diff']:.3g} (allowed {c['tolerance']:.3g})"
            + (f"; of the {len(q['fp32_nodes'])} nodes onnxruntime's INT8 keeps in FP32, {len(q['fp32_nodes_found'])} "
               "found by name in OpenVINO's graph and kept in FP32 by NNCF too" if q.get("fp32_nodes") else ""))


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


def _nothing_to_prune(prep: Prepared) -> BnSlimError:
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
    prep = prepare(model, options, inspecting=True)  # an invalid input is a note here, an error in prune
    plan = None
    if ratio is not None or options.threshold is not None:
        if ratio is not None:
            options = PruneOptions(**{**asdict(options), "ratio": ratio, "threshold": None})
        options.validate()
        plan = select(prep.analysis, options)
    return InspectResult(describe_spaces(prep.analysis, plan), prep.notes(options), ratio)


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
    return _prune(Pipeline(model), options, _options_given(options, kwargs))


def prune_prepared(pipeline: Pipeline, options: PruneOptions) -> PruneResult:
    """:func:`prune` on ``pipeline``'s model, reusing its preparation when ``options`` prepare
    alike (:func:`onnxslim_bn.app.pipeline.preparation_key`): sweep prunes every point so."""
    options.validate()
    return _prune(pipeline, options, _options_given(options, {}))


def _prune(pipeline: Pipeline, options: PruneOptions, given: dict) -> PruneResult:
    """The run as asked, then the policy: collapse attempts, the probe's alternatives."""
    result, prep = _prune_once(pipeline, options, given)
    found = collapse.of_report(result.report)
    if found is not None:
        result, prep = _attempts(pipeline, options, given, result, prep, found)
        if not found.resolved:
            log.warning("%s", found.message())
    _raise_failed_gate(result)
    if options.probe and result.report.removed_channels:  # nothing removed: the same model, nothing to time
        if result.fp32_model is None:
            result = _never_slower(pipeline, options, given, result, prep)
        else:  # the slim FP32 model timed for the record; the deployed pair acts: slim + INT8 against INT8 alone
            found = probe(prep.model, result.fp32_model, probe_inputs(prep.model, prep.input_shapes,
                                                                      samples=_user_samples(prep)), threads=options.threads)
            result.report.probe = found.to_dict()
            result.report.notes.append(found.summary())
            result = _probe_int8(pipeline, prep, options, result)
    return _handed_over(result, prep)


def _handed_over(result: PruneResult, prep: Prepared) -> PruneResult:
    """The result as it leaves the tool: without the node names it gave nameless nodes for its
    own bookkeeping (the input did not have them; the probes and INT8 read them until here),
    its size in the report as it will be written."""
    if prep.names.given:
        for model in {id(m): m for m in (result.model, result.fp32_model) if m is not None}.values():
            drop_given_names(model, prep.names)
        result.report.after.size_bytes = model_bytes(result.model)
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


def _never_slower(pipeline: Pipeline, options: PruneOptions, given: dict, result: PruneResult, prep: Prepared) -> PruneResult:
    """The probe (:func:`onnxslim_bn.app.bench.probe`): time the pruned model beside the original
    (and the original beside a copy of itself: the A/A band) in onnxruntime. Only when it is slower
    beyond that band, prune again keeping the layers the probe blames whole, then with widths on
    the machine's block, re-probe each that is about as exact as the first (:func:`_less_exact`),
    and keep the best (:func:`_better`); stop at the first that is faster. Only when none is better than slower is the first cut written as it is, with
    a warning naming what was tried."""
    feeds = probe_inputs(prep.model, prep.input_shapes, samples=_user_samples(prep))
    found = probe(prep.model, result.model, feeds, threads=options.threads)
    best, best_found, tried = result, found, []
    for label, alternative in (_probe_alternatives(options, given, found, prep, result) if found.slower else []):
        try:
            candidate, _ = _prune_once(pipeline, alternative, given)
        except BnSlimError as err:  # a gate of the check, or nothing left to prune
            tried.append(f"{label} (not possible: {str(err).split(': ', 1)[-1][:80]})")
            continue
        if candidate.report.verification is not None and candidate.report.verification.failed:
            tried.append(f"{label} (fails the check: {candidate.report.verification.failed})")
            continue
        if not candidate.report.removed_channels:
            tried.append(f"{label} (removes nothing)")
            continue
        worse = _less_exact(candidate.report.verification, result.report.verification)
        if worse:
            tried.append(f"{label} ({worse})")
            continue
        again = probe(prep.model, candidate.model, feeds, threads=options.threads)
        tried.append(f"{label} ({again.speedup:.2f}x, {again.verdict})")
        if _better(again, best_found):
            best, best_found = candidate, again
        if best_found.faster:
            break
    report = best.report
    report.probe = {**best_found.to_dict(), "tried": tried, "first": None if best is result else found.to_dict()}
    if best is not result:
        report.notes.append(f"probe: the first cut ran {found.speedup:.2f}x in onnxruntime, slower beyond "
                            f"its {found.band.describe()}; tried {', '.join(tried)}; wrote the best")
    report.notes.append(best_found.summary())
    if best_found.slower:
        log.warning("%s%s", best_found.message(), f"; also tried: {', '.join(tried)}" if tried else
                    "; nothing else to try (no layer to blame; the widths on the machine's block "
                    "already, or set by --round-to)")
    return best


# a faster candidate replaces the first cut only when it is about as exact: its check's top-1
# agreement at most this much lower, and its 1 - cosine at most CANDIDATE_COSINE_GAP times the
# first's. Without it, widths put on the block under a budget could cut far below it: a VGG at
# --target-macs 0.5 was written at 0.38 of its MACs, 92.2% -> 85.2% check agreement (81.8% held-out
# accuracy where the first cut kept 91.1%)
CANDIDATE_AGREEMENT_LOSS = 0.01
CANDIDATE_COSINE_GAP = 1.5


def _less_exact(candidate, first) -> str | None:
    """Why a probe candidate's check is markedly worse than the first cut's, or None."""
    if candidate is None or first is None:
        return None
    if candidate.top1_agreement is not None and first.top1_agreement is not None and \
            candidate.top1_agreement < first.top1_agreement - CANDIDATE_AGREEMENT_LOSS:
        return f"less exact: top-1 agreement {candidate.top1_agreement:.1%} against {first.top1_agreement:.1%}"
    if 1.0 - candidate.cosine > CANDIDATE_COSINE_GAP * (1.0 - first.cosine) + 1e-6:
        return f"less exact: cosine {candidate.cosine:.4f} against {first.cosine:.4f}"
    return None


def _better(candidate, best) -> bool:
    """Whether a re-probed cut beats the best so far: a better verdict against its own A/A band
    (faster, then same, then slower), or the same verdict and a ratio lower by more than the wider
    of the two bands (two timings of one model differ by that much)."""
    if rank(candidate.verdict) != rank(best.verdict):
        return rank(candidate.verdict) < rank(best.verdict)
    return candidate.ratio < best.ratio * math.exp(-max(candidate.band.half, best.band.half))


def _probe_alternatives(options: PruneOptions, given: dict, found, prep: Prepared,
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


def _attempts(pipeline: Pipeline, options: PruneOptions, given: dict, result: PruneResult, prep: Prepared,
              found: collapse.Collapse) -> tuple[PruneResult, Prepared]:
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
    budget = budget and found.step == "pruning"  # another cut cannot mend what the INT8 step lost
    for what, alternative in (_collapse_alternatives(options, result) if budget else ()):
        try:
            other, other_prep = _prune_once(pipeline, alternative, given)
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
    yield (f"{ATTEMPTS[2]} (--max-layer-ratio {options.layer_cap() / 2:g})",
           replace(options, max_layer_ratio=options.layer_cap() / 2))


def _prune_once(pipeline: Pipeline, options: PruneOptions, given: dict) -> tuple[PruneResult, Prepared]:
    """One run on the pipeline's preparation: cut, and with --target-latency time the cut and cut
    again aimed lower when it misses (each attempt on the graph as analysed); then finish the
    last cut. The gates' failure is recorded in the report's check, not raised (:func:`prune`
    raises it for the result it keeps)."""
    started = time.perf_counter()
    prep = pipeline.prepared(options)
    if not prep.analysis.prunable():
        raise _nothing_to_prune(prep)
    target = options.target_latency
    curves = _latency_table(prep, options) if target is not None else None
    attempts = 3 if target is not None else 1  # --target-latency: timed, tightened when missed
    for attempt in range(attempts):
        with restored(prep.graph):  # surgery edits the analysed graph; the next attempt finds it as analysed
            done = cut(prep, options, target, curves, started)
            notes = prep.notes(options) + list(done.notes)
            aim = None
            if target is not None:
                done, aim = _timed(prep, done, options, target, curves, attempt, notes)
            if aim is None or attempt == attempts - 1:
                end = finish(prep, done, options, given, notes)
                break
        target, started = aim, time.perf_counter()
    report = end.report
    found = collapse.of_report(report)
    if found is not None:
        report.collapse = found
    return PruneResult(end.model, report, end.check_inputs, end.check_outputs, end.reconstruction, end.fp32_model,
                       end.calibration_inputs, end.reference_outputs), prep


def _timed(prep: Prepared, done: Cut, options: PruneOptions, target: float, curves: dict, attempt: int,
           notes: list[str]) -> tuple[Cut, float | None]:
    """--target-latency: time the cut against the original; the cut with the timing in its
    budget (a note for it in ``notes``), and the next aim when it missed and a lower aim can help."""
    timed = _time_latency(prep, done.pruned, options)
    budget = {**done.plan.budget, "target": options.target_latency, "aimed": target, "measured": timed[1] / timed[0]}
    notes.append(f"--target-latency {options.target_latency:g} on {options.runtime}, batch "
                 f"{options.latency_batch}: {timed[0]:.3f} -> {timed[1]:.3f} ms measured "
                 f"({timed[1] / timed[0]:.1%}; the layer table predicted {budget['reached']:.1%}), "
                 f"attempt {attempt + 1}")
    aim = None
    if timed[1] / timed[0] <= options.target_latency * 1.03:
        budget["met"] = True  # as measured: never "out of reach", whatever the table predicted
    elif curves and not any(c.resolved for c in curves.values()):  # nothing to aim better with
        notes.append(f"--target-latency {options.target_latency:g} missed as measured, and not tightened: the "
                     "layer table sees no layer's width in the time, so a lower aim would only remove more "
                     "MACs on noise; this model's time is mostly outside its layers (use --target-macs)")
    else:
        aim = max(0.02, target * options.target_latency / (timed[1] / timed[0]))  # aim lower and try again
    return replace(done, plan=replace(done.plan, budget=budget)), aim


def _probe_int8(pipeline: Pipeline, prep: Prepared, options: PruneOptions, result: PruneResult) -> PruneResult:
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
    if not found.slower or not names:
        if found.slower:
            log.warning("%s", result.report.quantization["probe"]["message"])
        return result
    try:
        again = prune_prepared(pipeline, replace(options, keep=[*options.keep, *names], probe=False))
    except BnSlimError as exc:  # the gates or the budget refuse the second run: keep the first
        result.report.notes.append(f"INT8 probe: keeping {', '.join(names)} whole failed ({exc}); kept the first model")
        log.warning("%s", result.report.quantization["probe"]["message"])
        return result
    second = probe(alone.model, again.model, feeds, threads=options.threads)
    _record_int8_probe(again.report, second, options.latency_batch)
    line = (f"INT8 probe: slim + INT8 was slower than INT8 alone ({found.original_ms:.3f} -> "
            f"{found.pruned_ms:.3f} ms); keeping {', '.join(names)} whole gave {second.pruned_ms:.3f} ms "
            f"(INT8 alone {second.original_ms:.3f} ms)")
    better = _better(second, found)
    chosen, other = (again, result) if better else (result, again)
    chosen.report.notes.append(line + ("; wrote that one" if better else "; kept the first, the second was no better "
                                                                        "beyond the noise"))
    chosen.report.quantization["probe_retry"] = {"kept_whole": names, "first": found.to_dict(), "second": second.to_dict(),
                                                 "chose": "second" if better else "first"}
    if (second if better else found).slower:
        log.warning("%s", chosen.report.quantization["probe"]["message"])
    return chosen


def _record_int8_probe(report: Report, found, batch: int) -> None:
    """The INT8 pair's probe in the report: its numbers, one note, and the warning's text."""
    how = {"faster": "%.2fx faster than", "same": "at %.2fx, within the noise of,", "slower": "at %.2fx the speed of"}
    summary = (f"INT8 probe (onnxruntime, batch {batch}): slim + INT8 ran {how[found.verdict] % found.speedup} "
               f"INT8 alone ({found.original_ms:.3f} -> {found.pruned_ms:.3f} ms, {found.runs} alternating runs, "
               f"{found.band.describe()})")
    blamed = ", ".join(f"{b.node} ({b.original_ms:.3f} -> {b.pruned_ms:.3f} ms)" for b in found.blame[:3])
    message = (f"slim + INT8 is slower than INT8 alone in onnxruntime ({found.original_ms:.3f} -> "
               f"{found.pruned_ms:.3f} ms, beyond its {found.band.describe()})"
               + (f"; slower layers: {blamed}" if blamed else "") + "; try --round-to 32 or keep those layers (--keep)")
    report.quantization["probe"] = {**found.to_dict(), "batch": batch, "message": message if found.slower else None}
    report.notes.append(summary)


def _latency_table(prep: Prepared, options: PruneOptions) -> dict:
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


def _time_latency(prep: Prepared, pruned: onnx.ModelProto, options: PruneOptions) -> tuple[float, float]:
    """Original and pruned median ms on the target runtime, timed alternately."""
    feeds = probe_inputs(prep.model, prep.input_shapes, batch=options.latency_batch, samples=_user_samples(prep))
    return time_pair(prep.model, pruned, options.runtime, feeds, options.threads)


def _user_samples(prep: Prepared) -> dict[str, np.ndarray] | None:
    """The --data samples the timing runs on (the check's share; a timing needs real values, not
    held-out ones), or None without data."""
    samples = prep.check if prep.check is not None else prep.calibration
    return None if samples is None else samples.arrays


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


__all__ = ["PruneResult", "InspectResult", "prune", "inspect", "to_openvino"]

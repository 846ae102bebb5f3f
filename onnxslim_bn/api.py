"""The Python API: ``prune`` and ``inspect``. The command line is a thin layer over these."""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from . import verify
from .analysis import Analysis, analyze
from .errors import BnSlimError
from .fold import fold_constants, split_sequences
from .importance import add_data_scores, candidates
from .metrics import measure, weight_bytes
from .model_io import load_model
from .openvino_ir import OpenVinoResult, export_ir
from .plan import Plan, PruneOptions, select
from .report import Report, SpaceReport, describe_spaces
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


def _load(model: onnx.ModelProto | str | os.PathLike) -> tuple[onnx.ModelProto, str, int | None]:
    """The model, a name for messages, and its file size when it came from a file."""
    if isinstance(model, onnx.ModelProto):
        return model, model.graph.name or "<model>", None
    proto = load_model(model)
    data = Path(model).with_name(Path(model).name + ".data")
    return proto, str(model), Path(model).stat().st_size + (data.stat().st_size if data.is_file() else 0)


def _import(model: onnx.ModelProto) -> gs.Graph:
    """The graph, with Constant nodes and constant sub-computations turned into constants."""
    graph = gs.import_onnx(model)
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


def _prepare(model, options: PruneOptions) -> _Prepared:
    proto, source, size = _load(model)
    input_shapes, notes = resolve_input_shapes(proto, options.input_shapes, source)
    shapes = infer_shapes(proto, input_shapes, source)
    graph = _import(proto)
    analysis = analyze(graph, shapes, options.protects if options.keep else None)
    found, sess = candidates(analysis), None
    if found:  # one session of the original serves the calibration and, later, the check
        names = [t.name for _, t, _ in found]
        sess = verify.session(proto, source, extra_outputs=names)
        feeds, described = verify.make_inputs(proto, input_shapes, options.data, options.seed, calibration=True)
        add_data_scores(analysis, found, verify.run(sess, feeds, verify.static_batch(proto), names))
        notes.append(f"no BatchNormalization for some layers: their BN scale was recovered from activation statistics "
                     f"on {described}" + ("" if options.data else "; pass --data with real inputs for a closer estimate"))
    return _Prepared(proto, source, size, input_shapes, notes, shapes, graph, analysis, sess)


def _nothing_to_prune(prep: _Prepared) -> BnSlimError:
    ops = {n.op for n in prep.graph.nodes}
    if not prep.analysis.spaces:
        return BnSlimError(f"{prep.source}: no Conv or Gemm layer with a constant weight; nothing to prune")
    if "BatchNormalization" not in ops and not any(s.sources for s in prep.analysis.spaces):
        return BnSlimError(f"{prep.source}: no BatchNormalization node and no layer whose BN scale can be recovered "
                           f"(a Conv/Gemm with a bias); if it was trained with BN, re-export with BN kept: {KEEP_BN_FLAGS}")
    reasons = sorted({s.blocked[0] for s in prep.analysis.roots() if s.blocked and s.producers})
    return BnSlimError(f"{prep.source}: every BN-scaled channel group is blocked, e.g. {reasons[0] if reasons else 'unknown'}; "
                       "run `onnx-bnslim inspect` for the full list")


def inspect(model: onnx.ModelProto | str | os.PathLike, ratio: float | None = None,
            options: PruneOptions | None = None) -> InspectResult:
    """The channel spaces of a model, their importance statistics, and why any are blocked.

    With ``ratio``, also how many channels each space would lose at that ratio.
    """
    options = options or PruneOptions()
    prep = _prepare(model, options)
    plan = None
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
    clock = time.perf_counter()
    prep = _prepare(model, options)
    if not prep.analysis.prunable():
        raise _nothing_to_prune(prep)
    before = measure(prep.graph, prep.shapes, prep.size_bytes or weight_bytes(prep.model))
    plan: Plan = select(prep.analysis, options)
    stats = apply(prep.analysis, plan, options.exact_borders)
    pruned = _export(prep)
    seconds = {"prune": time.perf_counter() - clock}

    clock = time.perf_counter()
    pruned_shapes = infer_shapes(pruned, prep.input_shapes, "the pruned model")
    verification, feeds, outputs = None, {}, []
    if options.verify:
        verification, feeds, outputs = _verify(prep, pruned, options)
    seconds["verify"] = time.perf_counter() - clock
    report = Report(
        model=prep.source, output=None, options=_options_dict(options),
        before=before, after=measure(prep.graph, pruned_shapes, weight_bytes(pruned)),
        verification=verification, surgery=stats, spaces=describe_spaces(prep.analysis, plan),
        notes=prep.notes, seconds=seconds, chosen_channels=plan.chosen)
    return PruneResult(pruned, report, feeds, outputs)


def _export(prep: _Prepared) -> onnx.ModelProto:
    pruned = gs.export_onnx(prep.graph, do_type_check=False)
    original = prep.model
    pruned.ir_version = original.ir_version
    del pruned.opset_import[:]
    pruned.opset_import.extend(original.opset_import)
    pruned.producer_name, pruned.producer_version = original.producer_name, original.producer_version
    pruned.doc_string = original.doc_string
    del pruned.metadata_props[:]
    pruned.metadata_props.extend(original.metadata_props)
    pruned.metadata_props.add(key="onnx-bnslim", value="pruned")
    try:  # annotate shapes from a weight-less copy: no second copy of the weights in memory
        inferred = onnx.shape_inference.infer_shapes(skeleton(pruned, None), strict_mode=True)
        known = {t.name for t in pruned.graph.initializer} | {t.name for t in pruned.graph.input}
        pruned.graph.value_info.extend(v for v in inferred.graph.value_info if v.name not in known)
        return pruned
    except onnx.shape_inference.InferenceError as exc:
        raise BnSlimError(f"{prep.source}: the pruned graph fails shape inference ({str(exc).splitlines()[0]}); "
                          "nothing was written. This is a bug in onnx-bnslim: please report it with the model") from exc


def _verify(prep: _Prepared, pruned: onnx.ModelProto, options: PruneOptions):
    what = f"{prep.source} (pruned)"
    verify.check_model(pruned, what)
    feeds, described = verify.make_inputs(prep.model, prep.input_shapes, options.data, options.seed)
    names = [o.name for o in prep.model.graph.output]
    batch = verify.static_batch(prep.model)
    before = verify.run(prep.session or verify.session(prep.model, prep.source), feeds, batch, names)
    after = verify.run(verify.session(pruned, what), feeds, batch, names)
    result = verify.compare(names, before, after, described, what)
    if options.max_error is not None and result.max_abs_diff > options.max_error:
        raise BnSlimError(f"{what}: max |pruned - original| = {result.max_abs_diff:.3g} exceeds --max-error "
                          f"{options.max_error:g}; nothing was written. Lower --ratio or raise --max-error")
    return result, feeds, after


def _options_dict(options: PruneOptions) -> dict:
    out = asdict(options)
    return {k: v for k, v in out.items() if v not in (None, [], {})}


__all__ = ["PruneResult", "InspectResult", "prune", "inspect", "to_openvino"]

"""Prune at a series of budgets, in memory, and set the cost against the quality in one table.

Choosing the ratio is the main decision a Network Slimming user makes: ``sweep`` prunes the
same model once per budget (nothing is written but the table, the JSON and the plot) on one
preparation (:class:`onnxslim_bn.app.pipeline.Pipeline`: the model is loaded, analysed and
calibrated once, every point cuts the graph as analysed) and collects MACs, parameters and the
check's numbers on the same inputs (``--data``: held-out samples; else seeded random inputs).
"""

from __future__ import annotations

import logging
import math
import os
from dataclasses import asdict, dataclass, field, replace

import onnx

from ..errors import BnSlimError
from ..ir import data
from ..ir.model_io import load_model
from ..ir.shapes import resolve_input_shapes
from ..options import PruneOptions
from .api import prune_prepared
from .bench import probe, probe_inputs
from .histogram import require_matplotlib, save_png
from .pipeline import Pipeline
from .report import grid

log = logging.getLogger(__name__)

DEFAULT_RATIOS = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8)
BUDGETS = ("ratio", "threshold", "target_macs", "target_params")  # PruneOptions fields, one per sweep


@dataclass
class SweepPoint:
    budget: str  # one of BUDGETS
    value: float
    removed_channels: int | None = None
    macs: int | None = None
    parameters: int | None = None
    max_abs_diff: float | None = None
    max_rel_error: float | None = None  # max |pruned - original| / max |original| over the outputs
    cosine: float | None = None
    agreement: float | None = None  # top-1 agreement (lowest over classifier-shaped outputs)
    speedup: float | None = None  # --latency: original / pruned onnxruntime latency (bench.probe, batch 1)
    error: str | None = None  # why this budget could not be pruned


@dataclass
class SweepResult:
    model: str
    inputs: str
    macs: int  # of the original
    parameters: int
    points: list[SweepPoint] = field(default_factory=list)

    def to_dict(self) -> dict:
        return {"model": self.model, "inputs": self.inputs, "original": {"macs": self.macs, "parameters": self.parameters},
                "points": [asdict(p) for p in self.points]}

    def table(self) -> str:
        body = []
        for p in self.points:
            if p.error is not None:
                body.append((f"{p.value:g}", "-", "-", "-", "-", "-", "-", "-", p.error))
                continue
            body.append((f"{p.value:g}", str(p.removed_channels), f"{_si(p.macs)} ({p.macs / self.macs:.0%})",
                         f"{p.parameters:,} ({p.parameters / self.parameters:.0%})", _num(p.max_rel_error, ".3g"),
                         _num(p.cosine, ".6f"), "-" if p.agreement is None else f"{p.agreement:.2%}",
                         "-" if p.speedup is None else f"{p.speedup:.2f}x", ""))
        labels = {"ratio": "Ratio", "threshold": "Threshold", "target_macs": "Target MACs", "target_params": "Target params"}
        budget = labels.get(self.points[0].budget, "Budget") if self.points else "Budget"
        lines = grid((budget, "Removed", "MACs", "Parameters", "Max rel. error", "Cosine", "Top-1 agreement",
                      "Speed-up (ORT b1)", "Note"), body)
        lines.append(f"Original: {_si(self.macs)} MACs, {self.parameters:,} parameters; check on {self.inputs}.")
        return "\n".join(lines)


def _at(options: PruneOptions, budget: str, value: float) -> PruneOptions:
    """``options`` with this one budget set and the others cleared."""
    return replace(options, **{b: (value if b == budget else None) for b in BUDGETS if hasattr(options, b)})


def sweep(model: str | os.PathLike | onnx.ModelProto, options: PruneOptions, budget: str = "ratio",
          values: list[float] | None = None, latency: bool = False) -> SweepResult:
    """Prune ``model`` at each value of one budget (a :data:`BUDGETS` field of PruneOptions:
    ``ratio`` by default, at :data:`DEFAULT_RATIOS`) with the other ``options``; nothing is written.
    With ``latency``, each pruned model is also timed against the original (:func:`bench.probe`:
    alternating onnxruntime runs at batch 1, spinning off)."""
    if budget not in BUDGETS or not hasattr(options, budget):
        raise BnSlimError(f"sweep budget '{budget}' is not one of {', '.join(b for b in BUDGETS if hasattr(options, b))}")
    values = list(DEFAULT_RATIOS if values is None and budget == "ratio" else values or [])
    if not values:
        raise BnSlimError(f"--{budget.replace('_', '-')}s is empty; e.g. --ratios 0.1,0.3,0.5")
    source = str(model) if not isinstance(model, onnx.ModelProto) else (model.graph.name or "<model>")
    for value in values:  # every budget is checked before the first run
        _at(options, budget, value).validate()
    proto = model if isinstance(model, onnx.ModelProto) else load_model(model)
    samples = None  # --latency times on the user's samples when given (seeded random inputs otherwise)
    if latency and options.data is not None:
        shapes, _ = resolve_input_shapes(proto, options.input_shapes, source)
        samples = data.load(options.data, proto, shapes, options.preprocess).arrays
    result: SweepResult | None = None
    points = []
    pipeline = Pipeline(proto)  # every point prepares alike: only the budget differs
    for value in values:
        opts = replace(_at(options, budget, value), verify=True, max_error=None)
        point = SweepPoint(budget, value)
        try:
            run = prune_prepared(pipeline, opts)
        except BnSlimError as exc:
            point.error = str(exc).replace(proto.graph.name or "<model>", source, 1)
            points.append(point)
            log.info("%s %g: %s", budget, value, point.error)
            continue
        report = run.report
        if result is None:
            result = SweepResult(source, "", report.before.macs, report.before.parameters)
        v = report.verification
        scale = max((o.max_abs_value for o in v.outputs), default=0.0)
        top1 = [o.top1_agreement for o in v.outputs if o.top1_agreement is not None]
        point.removed_channels = report.removed_channels
        point.macs, point.parameters = report.after.macs, report.after.parameters
        point.max_abs_diff, point.cosine = float(v.max_abs_diff), float(v.cosine)
        point.max_rel_error = float(v.max_abs_diff / scale) if scale > 0 else (0.0 if v.max_abs_diff == 0 else math.inf)
        point.agreement = min(top1) if top1 else None
        if latency:

            point.speedup = probe(proto, run.model, probe_inputs(proto, options.input_shapes, samples=samples),
                                  threads=options.threads, profile_runs=1).speedup
        result.inputs = v.inputs + ("; every budget's model quantized to INT8 (--quantize) and compared, so "
                                    "quantized, with the FP32 original" if options.quantize else "")
        points.append(point)
    if result is None:
        raise BnSlimError(f"{source}: no budget could be pruned; the first failed with: {points[0].error}")
    result.points = points
    return result


def plot_sweep(result: SweepResult, path: str | os.PathLike) -> None:
    """Quality against MACs: cosine and top-1 agreement (left axis), max relative error (right, log)."""

    require_matplotlib()
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    done = [p for p in result.points if p.error is None]
    x = [100 * p.macs / result.macs for p in done]
    fig, ax = plt.subplots(figsize=(8, 4.5), dpi=100)
    ax.plot(x, [p.cosine for p in done], "o-", label="cosine")
    if all(p.agreement is not None for p in done):
        ax.plot(x, [p.agreement for p in done], "s-", label="top-1 agreement")
    for xi, p in zip(x, done):
        ax.annotate(f"{p.value:g}", (xi, p.cosine), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
    ax.set_xlabel("MACs kept (% of the original)")
    ax.set_ylabel("agreement with the original")
    ax.invert_xaxis()
    other = ax.twinx()
    other.plot(x, [max(p.max_rel_error, 1e-12) for p in done], "^--", color="tab:red", label="max rel. error")
    other.set_yscale("log")
    other.set_ylabel("max relative error (log)")
    lines = ax.get_legend_handles_labels()
    more = other.get_legend_handles_labels()
    ax.legend(lines[0] + more[0], lines[1] + more[1], loc="lower left")
    ax.set_title(f"{os.path.basename(result.model)}: quality vs MACs, by {done[0].budget if done else 'budget'}")
    fig.tight_layout()
    save_png(fig, path)


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _num(value: float | None, spec: str) -> str:
    return "-" if value is None else format(value, spec)

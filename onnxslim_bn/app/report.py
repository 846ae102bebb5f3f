"""What a run did, for people (tables) and for machines (JSON)."""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field

import numpy as np

from ..channels.context import Analysis
from ..channels.layout import Segment
from ..channels.reasons import Reason
from ..ir.ids import ObjectSet
from ..ir.openvino_ir import OpenVinoResult
from ..passes.metrics import Metrics
from ..passes.select import Plan
from ..passes.surgery import SurgeryStats
from ..passes.verify import Verification
from ..rules.roles import CASTS, NORMALIZATION
from ..version import __version__

# The JSON every command writes (prune's report, inspect, bench, sweep, --export-widths) carries
# this number. Bump it whenever a key is added, removed or renamed; tests/test_schema.py holds the
# key set of each document and fails when it changes without a bump.
SCHEMA_VERSION = 8


@dataclass
class SpaceLayer:
    """One layer that writes (part of) a space: its output channels ``at``.. are the space's
    channels ``offset``.. (``channels`` of them)."""

    node: str
    op: str
    weight: str  # the weight initializer's name (what the training code calls the layer), else the node name
    offset: int
    channels: int
    at: int = 0


@dataclass
class SpaceReport:
    """One channel space: who writes it, how important its channels are, what happens to it."""

    producers: list[str]
    channels: int
    kept: int
    source: str  # "bn" / "mul" / "folded" (comma-joined when mixed); "" without scores
    score_nodes: list[str]
    score_min: float | None
    score_median: float | None
    score_max: float | None
    blocked: str | None  # the first reason it cannot be pruned
    scores: list[float] = field(default_factory=list)  # per channel, in channel order
    removed: list[int] = field(default_factory=list)  # indices of the removed channels
    label: str = ""  # the first producer's weight name (e.g. layer1.0.conv1.weight), else its node name
    blocked_code: str | None = None  # the code of the first reason (channels.reasons.CODES)
    reasons: list[dict] = field(default_factory=list)  # every reason: {"code", "text"}
    layers: list[SpaceLayer] = field(default_factory=list)  # producers and depthwise convs, with their place


def weight_name(node) -> str:
    """The name of a layer's weight initializer (input 1 of Conv / Gemm / MatMul, else the first
    constant input with two or more dims; a BN of a pre-activation branch: its scale, input 1, as
    a framework names ``bn.weight``), or the node name when there is none."""
    import onnx_graphsurgeon as gs

    def stored(t):  # an fp16 weight behind a Cast (fold.restore_storage): the stored initializer
        if isinstance(t, gs.Variable) and len(t.inputs) == 1 and t.inputs[0].op in CASTS and \
                isinstance(t.inputs[0].inputs[0], gs.Constant):
            return t.inputs[0].inputs[0]
        return t

    consts = [(i, stored(t)) for i, t in enumerate(node.inputs)]
    consts = [(i, t) for i, t in consts if isinstance(t, gs.Constant) and len(t.shape) >= 2]
    if not consts:
        consts = [(i, t) for i, t in enumerate(node.inputs) if isinstance(t, gs.Constant) and len(t.shape) == 1
                  and node.op in NORMALIZATION]
    if not consts:
        return node.name
    index, tensor = next(((i, t) for i, t in consts if i == 1), consts[0])
    storage = getattr(tensor, "_bnslim_storage", None)  # fp16 behind a Cast: the stored initializer
    if storage is not None:
        return storage.source
    return getattr(tensor, "_bnslim_from", None) or tensor.name  # a sliced copy of a shared weight names it


def _layers(analysis: Analysis, space_id: int) -> list[SpaceLayer]:
    """Where each producer and depthwise conv of a root space writes into it."""
    root = analysis.find(space_id)
    space = analysis.spaces[root]
    out: list[SpaceLayer] = []
    for node in ObjectSet(space.writers + space.coupled):
        layout = analysis.layout(node.outputs[0]) if node.outputs else None
        if layout is None:
            continue
        at = 0
        for seg in layout:
            seg_root, first, size = analysis.where(seg)
            if seg_root == root:
                out.append(SpaceLayer(node.name, node.op, weight_name(node), first, size, at))
            at += size
    return out


def describe_spaces(analysis: Analysis, plan: Plan | None) -> list[SpaceReport]:
    out = []
    # read by reader BNs: such a space loses what every branch dropped, with or without a score
    branched = {analysis.find(seg.space) for sel in analysis.selectors for seg in sel.source}
    for space in analysis.roots():
        if not space.writers:
            continue
        scores = space.scores()
        reasons = list(space.blocked) or ([] if scores is not None or space.id in branched else
                                          [Reason("no-scale", None, f"no BatchNorm scale ranks the channels of {space.producers[0]}")])
        reason = str(reasons[0]) if reasons else None
        removed = plan.removed_mask((Segment(space.id, space.size),)) if plan is not None else np.zeros(space.size, bool)
        layers = _layers(analysis, space.id)
        out.append(SpaceReport(
            producers=space.producers, channels=space.size, kept=int(space.size - removed.sum()),
            removed=[int(i) for i in np.flatnonzero(removed)],
            source=",".join(space.source_kinds) or ("branches" if space.id in branched else ""),
            score_nodes=[s.label for s in space.sources],
            score_min=None if scores is None else float(scores.min()),
            score_median=None if scores is None else float(np.median(scores)),
            score_max=None if scores is None else float(scores.max()),
            blocked=reason, scores=[] if scores is None else [float(v) for v in scores],
            label=layers[0].weight if layers else space.producers[0],
            blocked_code=None if reason is None else reasons[0].code,
            reasons=[{"code": r.code, "text": str(r)} for r in reasons], layers=layers))
    return out


def coverage(spaces: list[SpaceReport]) -> dict:
    """Share of layer output channels that sit in prunable spaces; blocked ones by reason and by code."""
    total = sum(s.channels for s in spaces)
    prunable = sum(s.channels for s in spaces if s.blocked is None)
    reasons: dict[str, int] = {}
    codes: dict[str, int] = {}
    for s in spaces:
        if s.blocked is not None:
            reasons[s.blocked] = reasons.get(s.blocked, 0) + s.channels
            code = s.blocked_code
            codes[code] = codes.get(code, 0) + s.channels
    return {"channels": total, "prunable_channels": prunable,
            "prunable_fraction": prunable / total if total else 0.0,
            "blocked_by_code": codes, "blocked_by_reason": reasons}


def envelope(kind: str, payload: dict) -> dict:
    """A JSON document of one command: schema and tool version first, then the payload."""
    return {"schema_version": SCHEMA_VERSION, "tool_version": __version__, "kind": kind, **payload}


def dumps(doc: dict) -> str:
    """Strict JSON (a score of infinity, "never removed", becomes null), indented."""
    def clean(value):
        if isinstance(value, float) and not math.isfinite(value):
            return None
        if isinstance(value, dict):
            return {k: clean(v) for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [clean(v) for v in value]
        return value
    return json.dumps(clean(doc), indent=2, allow_nan=False, default=str)


def run_metadata(options: dict) -> dict[str, str]:
    """What the pruned model's metadata_props record about the run: tool, version, options."""
    return {"onnx-bnslim": "pruned", "onnx-bnslim.version": __version__,
            "onnx-bnslim.options": json.dumps(options, sort_keys=True, default=str)}


def export_widths(report: Report) -> dict:
    """Per layer: weight name, original and kept width, kept channel indices (``--export-widths``).

    A layer whose output spans several spaces (a depthwise conv after a concatenation) gets its
    pieces put back in its own channel order."""
    pieces: dict[str, list[tuple[int, SpaceLayer, list[int]]]] = {}
    for space in report.spaces:
        gone = set(space.removed)
        for layer in space.layers:
            kept = [c for c in range(layer.channels) if layer.offset + c not in gone]
            pieces.setdefault(layer.node, []).append((layer.at, layer, kept))
    layers = []
    for node, parts in pieces.items():
        parts.sort(key=lambda p: p[0])
        first = parts[0][1]
        kept = [at + c for at, _, idx in parts for c in idx]
        layers.append({"weight": first.weight, "node": node, "op": first.op,
                       "original": sum(p[1].channels for p in parts), "kept": len(kept), "kept_indices": kept})
    return envelope("widths", {"model": report.model, "output": report.output, "layers": layers})


@dataclass
class Report:
    model: str
    output: str | None
    options: dict
    before: Metrics
    after: Metrics
    verification: Verification | None
    surgery: SurgeryStats
    spaces: list[SpaceReport]
    notes: list[str] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)
    openvino: OpenVinoResult | None = None
    chosen_channels: int = 0  # what the ranking chose before rounding widths
    selection: dict = field(default_factory=dict)  # Plan.summary(): live channels removed, what was kept and why
    probe: dict | None = None  # bench.ProbeResult.to_dict() when the run timed original and pruned
    options_given: dict = field(default_factory=dict)  # what the caller set; ``options`` is every option as resolved
    # --quantize: settings, calibration samples, FP32-kept nodes and the check's steps (api._quantization_report)
    quantization: dict | None = None
    collapse: object | None = None  # collapse.Collapse: the check far worse than the cut warrants

    @property
    def removed_channels(self) -> int:
        return sum(s.channels - s.kept for s in self.spaces)

    @property
    def prunable_channels(self) -> int:
        return sum(s.channels for s in self.spaces if s.blocked is None)

    def to_dict(self) -> dict:
        return envelope("prune", {
            "model": self.model, "output": self.output,
            "options": {"given": self.options_given, "resolved": self.options},
            "removed_channels": self.removed_channels, "prunable_channels": self.prunable_channels,
            "chosen_channels": self.chosen_channels, "selection": self.selection, "probe": self.probe,
            "before": self.before.to_dict(), "after": self.after.to_dict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "compensation": asdict(self.surgery), "coverage": coverage(self.spaces),
            "spaces": [asdict(s) for s in self.spaces], "notes": self.notes, "seconds": self.seconds,
            "openvino": None if self.openvino is None else self.openvino.to_dict(),
            "quantization": self.quantization,
            "collapse": None if self.collapse is None else self.collapse.to_dict(),
        })

    def to_json(self) -> str:
        return dumps(self.to_dict())

    def table(self, verbose: bool = False) -> str:
        rows = [
            ("Conv/Gemm channels", self.before.channels, self.after.channels, _int),
            ("Parameters", self.before.parameters, self.after.parameters, _int),
            ("MACs", self.before.macs, self.after.macs, _si),
            ("Model size", self.before.size_bytes, self.after.size_bytes, _bytes),
        ]
        for op in sorted(set(self.before.ops) | set(self.after.ops)):  # op rows: what changed (-v: every op)
            if verbose or self.before.ops.get(op, 0) != self.after.ops.get(op, 0):
                rows.append((op, self.before.ops.get(op, 0), self.after.ops.get(op, 0), _int))
        body = [(name, fmt(a), fmt(b), _change(a, b)) for name, a, b, fmt in rows]
        lines = grid(("", "Original", "Pruned", "Change"), body)
        cut, alone = sum(1 for s in self.spaces if s.kept < s.channels), sum(1 for s in self.spaces if s.blocked)
        lines.append(f"Removed {self.removed_channels} of {self.prunable_channels} prunable channels in {_n(cut, 'space')} "
                     f"({_n(alone, 'space')} left alone; `onnx-bnslim inspect` says why).")
        lines.extend(selection_lines(self.selection, self.chosen_channels, self.removed_channels, self.options))
        if self.surgery.carried:
            lines.append(f"Removed channels' constants carried by a kept constant channel in "
                         f"{_n(self.surgery.carried, 'layer')}: the borders as exact as the carrier is constant (it varies by at "
                         "most 1% of its value), at any image size, with no op added.")
        if self.surgery.compensated_layers:
            lines.append(f"Removed channels' constants folded into {self.surgery.compensated_layers} layers' bias"
                         + (f", {self.surgery.border_maps} with a border map "
                            + ("(--exact-borders)" if self.options.get("exact_borders") else "(kept by the refit)")
                            if self.surgery.border_maps else "") + ".")
        if self.surgery.approximate:
            worst = {k: v for k, v in self.surgery.approximate.items() if v is not None}
            sizes = ", ".join(f"{k} {v:.3g}" for k, v in sorted(worst.items(), key=lambda kv: -kv[1])[:5])
            refit = self.options.get("compensation") == "reconstruct"
            lines.append(("Bias folding was approximate" if refit else "Approximate")
                         + " at the borders (zero padding meets removed constants) in "
                         f"{_n(len(self.surgery.approximate), 'layer')}"
                         + (f"; largest |error| added: {sizes}" if sizes else "; dynamic image size, not measured")
                         + ("; the refit below replaced it where it could." if refit else
                            ". --exact-borders makes them exact for fixed image sizes."))
        if self.surgery.uncompensated_channels:  # the plan keeps such channels: a bug if it shows
            lines.append(f"{self.surgery.uncompensated_channels} removed channels carry no known constant value.")
        if self.verification is not None:
            lines.extend(check_lines(self.verification))
        if self.quantization is not None:
            lines.extend(quantization_lines(self.quantization))
        if self.collapse is not None and not self.collapse.resolved:
            lines.append(self.collapse.message())
        if self.openvino is not None:
            ov = self.openvino
            kind = "INT8" if self.quantization is not None else "FP16" if ov.fp16 else "FP32"
            if ov.route == "nncf":
                c = ov.check
                agreement = "" if c["top1_agreement"] is None else f"top-1 agreement {c['top1_agreement']:.2%}, "
                lines.append(f"OpenVINO IR (INT8 by NNCF): {ov.xml}; vs the FP32 original: {agreement}cosine "
                             f"{c['cosine']:.5f}, max rel diff {c['max_rel_diff']:.3g}")
            else:
                lines.append(f"OpenVINO IR ({kind}{', QDQ read' if ov.route == 'qdq' else ''}): {ov.xml}; max |diff| "
                             f"vs onnxruntime {ov.max_abs_diff:.3g}")
        lines.extend(f"Note: {n}" for n in self.notes)
        if verbose:
            lines.append("")
            lines.extend(layer_table(self.before, self.after))
        return "\n".join(lines)


def quantization_lines(q: dict) -> list[str]:
    """The INT8 step: how, and what each step of the pipeline cost on the check samples."""
    s = q["settings"]
    lines = [f"INT8 ({s['format']}, {s['weights']} per-channel weights, {s['activations']} activations, "
             f"{s['calibration']} on {q['calibration_samples']} calibration samples"
             + (f", {len(q['excluded_nodes'])} nodes kept in FP32" if q["excluded_nodes"] else "")
             + "); the check above compares the deployed INT8 model with the FP32 original. Step by step:"]
    for key, label in (("pruning", "original -> slim (FP32)"), ("quantization", "slim -> slim + INT8"),
                       ("total", "original -> slim + INT8")):
        m = q["steps"].get(key)
        if m is None:
            continue
        agree = "" if m["top1_agreement"] is None else f"top-1 agreement {m['top1_agreement']:.1%}, "
        lines.append(f"  {label}: {agree}cosine {m['cosine']:.5f}, max rel. error {m['max_rel_diff']:.3g}")
    return lines


def selection_lines(sel: dict, chosen: int, removed: int, options: dict) -> list[str]:
    """How the chosen channels became the removed ones, and how many of them were alive."""
    lines = []
    if not sel:
        return lines
    cut = sel.get("cut") or {}
    if cut.get("score") is not None:
        lines.append(f"The cut: {cut['below']} of the {sel['ranked']} scored channels lie at or below score "
                     f"{cut['score']:.3g} (--ratio {options.get('ratio')}); those that can go are chosen.")
    if sel.get("kept_unknown_replacement"):
        where = ", ".join(list(sel.get("unknown_replacement_at", {}))[:3])
        lines.append(f"{sel['kept_unknown_replacement']} channels below the cut stay: their value is not a known "
                     f"constant where {where} reads them (a gate, a pad value, a border effect).")
    kept = [(sel.get("kept_by_branches", 0), "another reader BN's branch still uses them"),
            (sel.get("kept_as_carriers", 0), "a padded conv's border needs a kept constant channel to carry "
                                             "the removed constants exactly (a constant channel, one per such tensor)")]
    rounded = chosen - removed + sel.get("removed_by_branches", 0) + sel.get("removed_by_rounding", 0) \
        - sum(n for n, _ in kept)
    if rounded > 0:
        budget = sel.get("budget") or {}
        block = budget.get("round_to", options.get("round_to"))
        dead = sel.get("dead_kept_by_rounding", 0)
        how = "rounding widths to multiples of" if budget else "rounding widths up (never down past a kept channel) to"
        kept.append((rounded, f"{how} {block} and evening out conv groups"
                              + (f" ({dead} of them dead)" if dead else "") + " (--round-to 1 for the exact ratio)"))
    reasons = "; ".join(f"{n} because {why}" for n, why in kept if n > 0)
    if reasons:
        lines.append(f"The ranking chose {chosen}; kept {reasons}.")
    if sel.get("removed_by_branches"):
        lines.append(f"{sel['removed_by_branches']} shared channels removed: every reader BN's branch dropped them.")
    if sel.get("removed_by_rounding"):
        lines.append(f"{sel['removed_by_rounding']} more channels removed rounding widths down, all of them "
                     + ("within the budget." if sel.get("budget") else "dead (in the dead cluster or exactly 0)."))
    # a budget walks on past a channel it cannot take; a --ratio / --threshold cut keeps it, and takes none above the cut
    held = "passed over" if sel.get("budget") else "below the cut stay (nothing above the cut replaces them)"
    if sel.get("kept_by_min_channels"):
        lines.append(f"{sel['kept_by_min_channels']} channels {held}: their layer reached --min-channels "
                     f"{options.get('min_channels')} (or a Split / Slice part its last channel).")
    if sel.get("kept_by_layer_cap"):
        cap = options.get("max_layer_ratio")
        cap = f"{cap:.3g}" if isinstance(cap, (int, float)) else str(cap)
        lines.append(f"{sel['kept_by_layer_cap']} live channels {held}: their layer reached --max-layer-ratio {cap}.")
    level, top = sel.get("dead_level", 0.0), sel.get("max_removed_score")
    if top is not None:
        dead = f"the scores' dead cluster ends at {level:.3g}" if level > 0 else "the scores show no dead cluster"
        lines.append(f"Live channels removed: {sel.get('live_removed', 0)} ({dead}); largest score removed {top:.3g}.")
    budget = sel.get("budget") or {}
    if budget:
        what = {"params": "layer weights (Conv / Gemm / MatMul)"}.get(budget["metric"], budget["metric"])
        line = f"Budget: {what} at most {budget['target']:.1%} of the original; reached {budget['reached']:.1%}"
        if budget["metric"] == "params":
            line += " (the Parameters row also counts biases and BN parameters)"
        if budget["metric"] == "latency":
            line += " as the layer table predicts" + (f", {budget['measured']:.1%} measured" if "measured" in budget else "")
        if budget.get("met"):
            line += " -- met, as measured"
        elif budget.get("unreachable"):
            line += (" -- out of reach: that is all the removable channels allow (--max-layer-ratio, "
                     "--min-channels and the blocked layers limit it)")
        lines.append(line + ".")
    return lines


def check_lines(v: Verification) -> list[str]:
    """The check: inputs (count, source, calibration), worst metrics, one line per output when
    there are several, its notes, and the failure."""
    def metrics(o) -> str:
        text = (f"max |diff| {o.max_abs_diff:.3g} (outputs up to {o.max_abs_value:.3g}, relative {o.max_rel_diff:.3g}), "
                f"cosine {o.cosine:.6f}")
        if o.top1_agreement is not None:
            text += f", top-1 agreement {o.top1_agreement:.2%}"
            text += f" over {o.top1_positions} positions" if o.top1_positions != o.samples else ""
        return text

    head = f"Check (onnxruntime, {v.inputs})"
    if len(v.outputs) == 1:
        lines = [f"{head}: {metrics(v.outputs[0])}"]
    else:
        lines = [f"{head}, {len(v.outputs)} outputs:"]
        lines.extend(f"  '{o.name}' {o.shape}: {metrics(o)}" for o in v.outputs)
    lines.extend(f"Note (check): {n}" for n in v.notes)
    if v.failed:
        lines.append(f"Check FAILED: {v.failed}")
    return lines


def layer_table(before: Metrics, after: Metrics) -> list[str]:
    body = []
    for name, layer in before.layers.items():
        new = after.layers.get(name, {"out_channels": 0, "macs": 0})
        body.append((name, layer["op"], f"{layer['out_channels']} -> {new['out_channels']}",
                     f"{_si(layer['macs'])} -> {_si(new['macs'])}"))
    return grid(("Layer", "Op", "Channels", "MACs"), body)


def inspect_table(spaces: list[SpaceReport], ratio: float | None, threshold: float | None = None) -> str:
    budget = f"at {ratio:g}" if ratio is not None else f"below {threshold:g}" if threshold is not None else None
    body = []
    for s in spaces:
        head = (s.label or s.producers[0]) + (f" (+{len(s.producers) - 1})" if len(s.producers) > 1 else "")
        stats = "-" if s.score_min is None else f"{s.score_min:.2g} / {s.score_median:.2g} / {s.score_max:.2g}"
        lose = "" if budget is None or s.blocked else str(s.channels - s.kept)
        body.append((head, str(s.channels), s.source or "-", stats, lose, s.blocked or "prunable"))
    cov = coverage(spaces)
    lines = grid(("Space (first layer's weight)", "Channels", "Source", "|scale| min / median / max",
                   f"Removed {budget}" if budget is not None else "Removed", "Status"), body)
    lines.append(f"Coverage: {cov['prunable_channels']} of {cov['channels']} layer output channels "
                 f"({cov['prunable_fraction']:.1%}) are prunable.")
    codes = {s.blocked: s.blocked_code for s in spaces if s.blocked}
    for reason, n in sorted(cov["blocked_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  blocked ({n} channels) [{codes[reason]}]: {reason}")
    return "\n".join(lines)


def grid(header: tuple, body: list[tuple]) -> list[str]:
    """An ASCII table: figures right-aligned, words left-aligned."""
    widths = [max(len(str(r[i])) for r in [header, *body]) for i in range(len(header))]
    figures = [i > 0 and all(str(r[i])[:1] in "0123456789+-." or not str(r[i]) for r in body) for i in range(len(header))]
    rule = "+" + "+".join("-" * (w + 2) for w in widths) + "+"

    def line(row: tuple) -> str:
        cells = [f" {str(c):>{w}} " if right else f" {str(c):<{w}} " for c, w, right in zip(row, widths, figures)]
        return "|" + "|".join(cells) + "|"

    return [rule, line(header), rule, *(line(r) for r in body), rule]


def _n(count: int, noun: str) -> str:
    return f"{count} {noun}{'' if count == 1 else 's'}"


def _int(n: int) -> str:
    return f"{n:,}"


def _si(n: float) -> str:
    for unit, scale in (("G", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def _bytes(n: float) -> str:
    for unit, scale in (("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if n >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def _change(a: float, b: float) -> str:
    if a == b:
        return "0"
    return f"{(b - a) / a:+.1%}" if a else f"+{b}"

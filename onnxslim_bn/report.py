"""What a run did, for people (tables) and for machines (JSON)."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

import numpy as np

from .analysis import Analysis, Segment
from .metrics import Metrics
from .openvino_ir import OpenVinoResult
from .plan import Plan
from .surgery import SurgeryStats
from .verify import Verification


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


def describe_spaces(analysis: Analysis, plan: Plan | None) -> list[SpaceReport]:
    out = []
    for space in analysis.roots():
        if not space.producers:
            continue
        scores = space.scores()
        reason = space.blocked[0] if space.blocked else (None if scores is not None else
                 f"no BatchNorm scale ranks the channels of {space.producers[0]}")
        removed = plan.removed_mask((Segment(space.id, space.size),)) if plan is not None else np.zeros(space.size, bool)
        out.append(SpaceReport(
            producers=space.producers, channels=space.size, kept=int(space.size - removed.sum()),
            removed=[int(i) for i in np.flatnonzero(removed)],
            source=",".join(space.source_kinds), score_nodes=[s.node for s in space.sources],
            score_min=None if scores is None else float(scores.min()),
            score_median=None if scores is None else float(np.median(scores)),
            score_max=None if scores is None else float(scores.max()),
            blocked=reason, scores=[] if scores is None else [float(v) for v in scores]))
    return out


def coverage(spaces: list[SpaceReport]) -> dict:
    """Share of layer output channels that sit in prunable spaces; blocked ones by reason."""
    total = sum(s.channels for s in spaces)
    prunable = sum(s.channels for s in spaces if s.blocked is None)
    reasons: dict[str, int] = {}
    for s in spaces:
        if s.blocked is not None:
            reasons[s.blocked] = reasons.get(s.blocked, 0) + s.channels
    return {"channels": total, "prunable_channels": prunable,
            "prunable_fraction": prunable / total if total else 0.0, "blocked_by_reason": reasons}


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

    @property
    def removed_channels(self) -> int:
        return sum(s.channels - s.kept for s in self.spaces)

    @property
    def prunable_channels(self) -> int:
        return sum(s.channels for s in self.spaces if s.blocked is None)

    def to_dict(self) -> dict:
        return {
            "model": self.model, "output": self.output, "options": self.options,
            "removed_channels": self.removed_channels, "prunable_channels": self.prunable_channels,
            "chosen_channels": self.chosen_channels,
            "before": self.before.to_dict(), "after": self.after.to_dict(),
            "verification": None if self.verification is None else self.verification.to_dict(),
            "compensation": asdict(self.surgery), "coverage": coverage(self.spaces),
            "spaces": [asdict(s) for s in self.spaces], "notes": self.notes, "seconds": self.seconds,
            "openvino": None if self.openvino is None else self.openvino.to_dict(),
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    def table(self, verbose: bool = False) -> str:
        rows = [
            ("Conv/Gemm channels", self.before.channels, self.after.channels, _int),
            ("Parameters", self.before.parameters, self.after.parameters, _int),
            ("MACs", self.before.macs, self.after.macs, _si),
            ("Model size", self.before.size_bytes, self.after.size_bytes, _bytes),
        ]
        for op in sorted(set(self.before.ops) | set(self.after.ops)):
            rows.append((op, self.before.ops.get(op, 0), self.after.ops.get(op, 0), _int))
        body = [(name, fmt(a), fmt(b), _change(a, b)) for name, a, b, fmt in rows]
        lines = grid(("", "Original", "Pruned", "Change"), body)
        cut, alone = sum(1 for s in self.spaces if s.kept < s.channels), sum(1 for s in self.spaces if s.blocked)
        lines.append(f"Removed {self.removed_channels} of {self.prunable_channels} prunable channels in {_n(cut, 'space')} "
                     f"({_n(alone, 'space')} left alone; `onnx-bnslim inspect` says why).")
        if self.chosen_channels > self.removed_channels:
            lines.append(f"The ranking chose {self.chosen_channels}; rounding widths to multiples of "
                         f"{self.options.get('round_to')} (and equal counts per conv group) kept "
                         f"{self.chosen_channels - self.removed_channels} of them (--round-to 1 for the exact ratio).")
        if self.surgery.compensated_layers:
            lines.append(f"Removed channels' constants folded into {self.surgery.compensated_layers} layers' bias"
                         + (f" ({self.surgery.approximate_layers} padded convs: exact inside, approximate at borders)"
                            if self.surgery.approximate_layers else "") + ".")
        if self.surgery.uncompensated_channels:
            lines.append(f"{self.surgery.uncompensated_channels} removed channels carry no constant value "
                         "(not after a BN): their contribution is dropped.")
        if self.verification is not None:
            v = self.verification
            scale = max(o.max_abs_value for o in v.outputs)
            line = f"Check (onnxruntime, {v.inputs}): max |diff| {v.max_abs_diff:.3g} (outputs up to {scale:.3g}), cosine {v.cosine:.6f}"
            top1 = [o.top1_agreement for o in v.outputs if o.top1_agreement is not None]
            if top1:
                line += f", top-1 agreement {min(top1):.2%}"
            lines.append(line)
        if self.openvino is not None:
            ov = self.openvino
            lines.append(f"OpenVINO IR ({'FP16' if ov.fp16 else 'FP32'}): {ov.xml}; max |diff| vs onnxruntime {ov.max_abs_diff:.3g}")
        lines.extend(f"Note: {n}" for n in self.notes)
        if verbose:
            lines.append("")
            lines.extend(layer_table(self.before, self.after))
        return "\n".join(lines)


def layer_table(before: Metrics, after: Metrics) -> list[str]:
    body = []
    for name, layer in before.layers.items():
        new = after.layers.get(name, {"out_channels": 0, "macs": 0})
        body.append((name, layer["op"], f"{layer['out_channels']} -> {new['out_channels']}",
                     f"{_si(layer['macs'])} -> {_si(new['macs'])}"))
    return grid(("Layer", "Op", "Channels", "MACs"), body)


def inspect_table(spaces: list[SpaceReport], ratio: float | None) -> str:
    body = []
    for s in spaces:
        head = s.producers[0] + (f" (+{len(s.producers) - 1})" if len(s.producers) > 1 else "")
        stats = "-" if s.score_min is None else f"{s.score_min:.2g} / {s.score_median:.2g} / {s.score_max:.2g}"
        lose = "" if ratio is None or s.blocked else str(s.channels - s.kept)
        body.append((head, str(s.channels), s.source or "-", stats, lose, s.blocked or "prunable"))
    cov = coverage(spaces)
    lines = grid(("Space (producer)", "Channels", "Source", "|scale| min / median / max",
                   f"Removed at {ratio}" if ratio is not None else "Removed", "Status"), body)
    lines.append(f"Coverage: {cov['prunable_channels']} of {cov['channels']} layer output channels "
                 f"({cov['prunable_fraction']:.1%}) are prunable.")
    for reason, n in sorted(cov["blocked_by_reason"].items(), key=lambda kv: -kv[1]):
        lines.append(f"  blocked ({n} channels): {reason}")
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

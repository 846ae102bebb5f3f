"""A check result far worse than the cut warrants: a collapse, said loudly, and the budget
run's other attempts.

What a cut warrants was measured on ordinary models (fixtures/plain: VGG, ResNet, DenseNet,
MobileNetV2, BN-kept and folded, MAC budgets 0.9 ... 0.3, 64 check samples; the tuning set's
bottleneck ResNet and SE MobileNet, 128 check samples), as multiples of the share of MACs
removed (the cut):

- ``1 - cosine`` of healthy results (data ranking + refit): 0.001-0.09 times the cut; of
  collapsed ones (|gamma| ranking with bias folding on the same models: 10-50% agreement) 0.62-2.5,
  and 0.23 for the issue's folded ResNet at 0.5 (59% agreement, cosine 0.886).
- top-1 disagreement: healthy 0.0-0.35 times the cut at cuts of 30-70%, but up to 0.70 at a
  10% cut (the bottleneck ResNet: a few near-ties flip, cosine 0.995); collapsed 0.81-4.4.

So a result is a collapse when ``1 - cosine`` exceeds ``LOSS_PER_CUT / 4`` times the cut and,
for class scores, its disagreement also exceeds :data:`LOSS_PER_CUT` times the cut (and the
check's noise, three samples): agreement alone flips on near-ties at small cuts.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# top-1 disagreement above this multiple of the share of MACs removed, with 1 - cosine above a
# quarter of it, is far worse than the cut warrants (a collapse); measurements: module docstring
LOSS_PER_CUT = 0.6


@dataclass
class Collapse:
    """Why the result counts as collapsed, and what the budget run tried instead."""

    cut: float  # share of the MACs removed
    agreement: float | None  # the check's worst top-1 agreement (None: no class-score output)
    cosine: float  # the check's worst cosine
    allowed_disagreement: float  # what the cut warrants (LOSS_PER_CUT x cut, or the check's noise)
    allowed_cosine_loss: float  # the same for 1 - cosine (a quarter of it)
    attempts: list[dict] = field(default_factory=list)  # {"what", "agreement", "cosine", "collapsed", "chosen"}
    resolved: bool = False  # an attempt did better and is the result
    # "quantization": with --quantize, the pruned FP32 model is within what the cut warrants and
    # the INT8 step is what collapsed (another cut would not help); "pruning" otherwise
    step: str = "pruning"
    pruning: dict | None = None  # with --quantize: the pruning step's numbers (quantize.step_metrics)

    def message(self) -> str:
        got = f"cosine {self.cosine:.4f}" + (f", top-1 agreement {self.agreement:.2%}" if self.agreement is not None else "")
        allowed = f"cosine {1 - self.allowed_cosine_loss:.4f}" + \
            (f" or agreement {1 - self.allowed_disagreement:.1%}" if self.agreement is not None else "")
        if self.step == "quantization":
            p = self.pruning or {}
            kept = f"cosine {p.get('cosine', float('nan')):.4f}" + \
                (f", agreement {p['top1_agreement']:.2%}" if p.get("top1_agreement") is not None else "")
            return (f"WARNING: the INT8 model collapsed: {got} against the FP32 original, far worse than the cut of "
                    f"{self.cut:.0%} of the MACs warrants (at least {allowed}); pruning alone kept {kept}: the "
                    "quantization lost it (per-tensor INT8 ranges do not suit this model's activations). Do not "
                    "deploy it without checking it on your data; --int8-fp32 N keeps more layers in FP32, or drop "
                    "--quantize")
        return (f"WARNING: the pruned model collapsed: {got} with {self.cut:.0%} of the MACs removed, far worse than "
                f"that cut warrants (at least {allowed}); do not deploy it without checking it on your data")

    def to_dict(self) -> dict:
        return asdict(self)


def judge(agreement: float | None, cosine: float, cut: float, samples: int) -> Collapse | None:
    """The collapse of a check result (worst agreement and cosine over the outputs, on
    ``samples`` check samples) after removing the share ``cut`` of the MACs, or None."""
    cut = max(0.0, cut)
    allowed = max(LOSS_PER_CUT * cut, 3.0 / max(samples, 1))
    allowed_cos = allowed / 4
    collapsed = not (1.0 - cosine <= allowed_cos) and (agreement is None or not (1.0 - agreement <= allowed))
    if not collapsed:
        return None
    return Collapse(cut, agreement, cosine, allowed, allowed_cos)


def of_report(report) -> Collapse | None:
    """:func:`judge` applied to a prune report's check (None without a check)."""
    v = report.verification
    if v is None or not v.outputs or not report.before.macs:
        return None
    cut = 1.0 - report.after.macs / report.before.macs
    samples = min(o.samples for o in v.outputs)
    found = judge(v.top1_agreement, v.cosine, cut, samples)
    pruning = ((getattr(report, "quantization", None) or {}).get("steps") or {}).get("pruning")
    if found is not None and pruning and pruning.get("cosine") is not None \
            and judge(pruning.get("top1_agreement"), pruning["cosine"], cut, samples) is None:
        found.step, found.pruning = "quantization", dict(pruning)
    return found


def quality(report) -> tuple[float, float]:
    """What ranks the attempts: the check's worst agreement (1 without class scores), then cosine."""
    v = report.verification
    agreement = v.top1_agreement
    return (1.0 if agreement is None else agreement, v.cosine)

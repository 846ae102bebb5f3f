"""A check result far worse than the cut warrants: a collapse, said loudly, and the budget
run's other attempts.

What a cut warrants was measured on the project's ordinary models (fixtures/plain: VGG,
ResNet, DenseNet, MobileNetV2, BN-kept and folded, MAC budgets 0.9 ... 0.3, 64 check
samples): the top-1 disagreement of a healthy result (data ranking + refit) stayed within
0.00-0.31 of the share of MACs removed (0.31 only at a 10% cut, where two samples of 64 are
0.03), 0.05-0.18 at cuts of 30-70%; the issue's ordinary ResNet and SE MobileNet, 0.12-0.19
at half the MACs. Collapsed results (|gamma| ranking with bias folding on the same models, and
the issue's folded ResNet at 0.5: 59% agreement) came to 0.81-4.4 times the cut. A result is a
collapse when its disagreement exceeds :data:`LOSS_PER_CUT` times the cut (and the noise of
the check, three samples); for outputs that are not class scores, when ``1 - cosine`` exceeds
a quarter of that (healthy results measured 0.001-0.063 times the cut, collapses 0.23-2.5).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field

# top-1 disagreement above this multiple of the share of MACs removed is far worse than the
# cut warrants (a collapse); see the module docstring for the measurements behind it
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

    def message(self) -> str:
        got = f"top-1 agreement {self.agreement:.2%}" if self.agreement is not None else f"cosine {self.cosine:.4f}"
        allowed = f"{1 - self.allowed_disagreement:.1%}" if self.agreement is not None else \
            f"{1 - self.allowed_cosine_loss:.4f}"
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
    collapsed = not (1.0 - agreement <= allowed) if agreement is not None else not (1.0 - cosine <= allowed_cos)
    if not collapsed:
        return None
    return Collapse(cut, agreement, cosine, allowed, allowed_cos)


def of_report(report) -> Collapse | None:
    """:func:`judge` applied to a prune report's check (None without a check)."""
    v = report.verification
    if v is None or not v.outputs or not report.before.macs:
        return None
    cut = 1.0 - report.after.macs / report.before.macs
    return judge(v.top1_agreement, v.cosine, cut, min(o.samples for o in v.outputs))


def quality(report) -> tuple[float, float]:
    """What ranks the attempts: the check's worst agreement (1 without class scores), then cosine."""
    v = report.verification
    agreement = v.top1_agreement
    return (1.0 if agreement is None else agreement, v.cosine)

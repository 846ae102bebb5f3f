"""A budget (--target-macs / --target-params / --target-latency): the fewest channels, in order
of importance per unit of cost, that bring the cost down to it, on the coarsest block that can."""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from ...errors import BnSlimError
from .costs import Costs
from .plan import Plan
from .ranking import Ranking
from .walk import Walk

# a budget met on the machine's block may land this far (a fraction of the original's cost)
# under the target; further, finer blocks are tried (narrow layers step by a whole block)
BUDGET_SLACK = 0.02
BLOCK_FLOOR = 4  # the finest halved block: below it a width is as good as unrounded for the kernels


def within_budget(ranking: Ranking, curves: dict | None = None) -> Plan:
    """The fewest channels, taken in order of importance per unit of cost, that bring the MACs
    (or parameters, or ms) to the budget: a bisection over the length of the walk, each
    candidate plan costed exactly (rounding and derived removals included). When widths on the
    block (``round_to``) cannot come within ``BUDGET_SLACK`` of the budget, halved blocks are
    tried, and the plan says which it used."""
    analysis, options = ranking.analysis, ranking.options
    which = 0 if options.target_macs is not None else 1 if options.target_params is not None else 2
    if which == 2 and not curves:
        raise BnSlimError("--target-latency needs the per-layer latency table (onnxslim_bn.passes.latency); "
                          "prune() measures it: pass the model through prune()")
    costs = Costs(analysis, ranking.dead if options.exact_borders else None, curves if which == 2 else None)
    fraction = (options.target_macs, options.target_params, options.target_latency)[which]
    full = costs.totals({})[which]
    per_channel = _channel_costs(ranking, costs, which)
    order = np.argsort(ranking.flat / np.maximum(per_channel, 1e-30), kind="stable")
    limit = fraction * full
    # --round-to auto only (a block the user set is kept): the machine's block, then halved ones
    # down to BLOCK_FLOOR for the layers off the machine's block, then for every layer, and last
    # unrounded widths, until the plan comes within BUDGET_SLACK under the budget
    machine, tried = options.block(), []
    halved = []
    while options.round_to == "auto" and (halved or [machine])[-1] // 2 >= min(machine, BLOCK_FLOOR):
        halved.append((halved or [machine])[-1] // 2)
    steps = [(machine, False)] + [(b, False) for b in halved] + [(b, True) for b in halved]
    if options.round_to == "auto" and machine > 1:
        steps.append((1, True))
    for block, everywhere in steps:
        best, reached = _longest_fit(Walk(ranking, block, everywhere, costs, which), order, costs, which, limit)
        tried.append((block, best, reached, everywhere))
        if best is not None and reached >= limit - BUDGET_SLACK * full:
            break
    met = [t for t in tried if t[1] is not None]
    # the met plan nearest the budget (the last tried, when it came within the slack), else (out
    # of reach on every block) the one that came closest
    block, best, reached, everywhere = max(met, key=lambda t: (t[2], t[0])) if met else \
        min(tried, key=lambda t: (t[2], -t[0]))
    if block != tried[0][0]:
        first = tried[0]
        missed = f"under the budget kept {first[2] / full:.1%}" if first[1] is not None else \
            f"could reach only {first[2] / full:.1%}"
        where = "in every layer" if everywhere else "in the layers whose width is off that block (the others keep it)"
        how = f"widths rounded to multiples of {block}, not {first[0]}, {where}" if block > 1 else \
            f"widths left unrounded, not on multiples of {first[0]} (some convs may leave the blocked kernels)"
        notes = [f"{how}: on the coarser block the nearest plan {missed} (budget {fraction:.1%}); "
                 "narrow layers cannot step finer"]
    else:
        notes = []
    plan = Walk(ranking, block, everywhere, costs, which).plan(order, len(order) if best is None else best)
    reached = costs.totals({r: ~np.isin(np.arange(analysis.spaces[r].size), k) for r, k in plan.kept.items()})[which]
    budget = {"metric": ("macs", "params", "latency")[which], "target": fraction,
              "reached": reached / full if full else 1.0, "round_to": block}
    if best is None:  # everything the constraints allow is removed and the budget is still missed
        budget["unreachable"] = True
    return replace(plan, notes=plan.notes + notes, budget=budget)


def _longest_fit(walk: Walk, order: np.ndarray, costs: Costs, which: int, limit: float) -> tuple[int | None, float]:
    """The length of the walk whose plan (rounded as ``walk.block`` says) comes nearest under
    ``limit``, and the cost it reaches: a bisection, then a scan of the 48 lengths before it
    (rounding makes the cost step, so the nearest fit may lie a little earlier). None when
    even the whole walk stays above the limit."""
    lo, hi, best = 0, len(order), None
    while lo <= hi:
        mid = (lo + hi) // 2
        if costs.totals(walk.removed(order, mid)[0])[which] <= limit:
            best, hi = mid, mid - 1
        else:
            lo = mid + 1
    if best is None:  # out of reach: what the whole walk comes to
        return None, costs.totals(walk.removed(order, len(order))[0])[which]
    fits = {best: costs.totals(walk.removed(order, best)[0])[which]}
    for n in range(max(0, best - 48), best):
        reached = costs.totals(walk.removed(order, n)[0])[which]
        if reached <= limit:
            fits[n] = reached
    best = max(fits, key=lambda n: (fits[n], -n))
    return best, fits[best]


def _channel_costs(ranking: Ranking, costs: Costs, which: int) -> np.ndarray:
    """What removing each ranked channel alone saves (MACs or parameters), in walk order."""
    saved = costs.per_channel(which)
    return np.concatenate([saved[costs.offset[s.id]:costs.offset[s.id] + s.size] for s in ranking.spaces]) \
        if ranking.spaces else np.zeros(0)

"""Choosing channels: one global ranking by importance over every prunable space.

``ranking`` reads what the walk ranks from the analysis (and never writes into it), ``walk``
takes channels in ranked order under the constraints, ``rounding`` puts widths on the block,
``branches`` settles the tensors reader BNs share, ``costs`` and ``budget`` serve the budgets;
``plan`` is the result, ``levels`` the dead level.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np

from ...channels.context import Analysis
from ...options import RATIO_LAYER_CAP, PruneOptions
from .budget import BUDGET_SLACK, within_budget
from .carriers import CARRIER_NOISE, carriers, hold_carriers
from .levels import DATA_DEAD_SHARE, data_dead_level, dead_level
from .plan import Plan
from .ranking import Ranking
from .walk import Walk

__all__ = ["BUDGET_SLACK", "CARRIER_NOISE", "DATA_DEAD_SHARE", "carriers", "Plan", "data_dead_level", "dead_level", "select"]


def select(analysis: Analysis, options: PruneOptions, curves: dict | None = None) -> Plan:
    """Choose which channels go.

    One global ranking by importance over every prunable space, walked greedily from the least
    important channel: ``ratio`` cuts the ranking at that fraction of the ranked (scored) channels
    (Network Slimming's percentile, counting the channels that cannot go), ``threshold`` at a score; every channel below the cut goes
    unless a constraint holds it, and a channel held is not replaced by one above the cut;
    ``target_macs`` / ``target_params`` / ``target_latency`` take as many as it takes to reach
    the budget (ranked by importance per MAC, parameter or millisecond saved; the
    latency ``curves`` come from :func:`onnxslim_bn.passes.latency.layer_latency_table`). The walk
    skips a channel when

    - its replacement value is not a known constant at some consumer (:mod:`onnxslim_bn.passes.replacement`),
    - its space would fall below ``min_channels``, or a Split / Slice part below one channel,
    - its layer would lose more than ``max_layer_ratio`` of its live channels (channels in the
      dead cluster, see :func:`dead_level`, are not limited).

    Then grouped convs even out their groups, kept widths are rounded to the block (``round_to``,
    up or down, :class:`.rounding.Rounding`), and a tensor read by reader BNs' branches (see
    :class:`onnxslim_bn.channels.context.Selector`) loses only the channels every one of them dropped.
    """
    ranking = Ranking.of(analysis, options)
    if options.target_macs is None and options.target_params is None and options.target_latency is None:
        flat = ranking.flat
        order = np.argsort(flat, kind="stable")  # global ranking; ties keep graph order
        if options.threshold is not None:  # every channel below it that can go (the walk counts those that cannot)
            below = order[flat[order] < options.threshold]
            plan = Walk(ranking).plan(below, len(below))
            plan.carriers_held = _carriers_held(plan, ranking, options)
            return plan
        # the cut at that fraction of every scored channel (Network Slimming's percentile of all
        # gammas): a channel below it that cannot go -- an unknown replacement, a constraint --
        # stays, and nothing above the cut goes in its place
        below = order[:int(math.floor(options.ratio * len(order) + 1e-9))]
        plan = Walk(ranking).plan(below, len(below))
        plan.cut = {"below": len(below), "score": float(flat[below[-1]]) if len(below) else None}
        plan.carriers_held = _carriers_held(plan, ranking, options)
        return plan
    plan = within_budget(ranking, curves)
    plan.budget["layer_cap"] = options.layer_cap()
    if options.max_layer_ratio is None and plan.budget.get("unreachable") and options.layer_cap() < RATIO_LAYER_CAP:
        wider = within_budget(replace(ranking, options=replace(options, max_layer_ratio=RATIO_LAYER_CAP)), curves)
        wider.budget["layer_cap"] = RATIO_LAYER_CAP
        wider.notes.append(f"the budget needs layers to lose more than {options.layer_cap():.0%} of their live "
                           f"channels (a budget's default cap): they may lose up to {RATIO_LAYER_CAP:.0%}")
        return wider
    return plan


def _carriers_held(plan: Plan, ranking: Ranking, options: PruneOptions) -> int:
    """Bias folding's carriers (:mod:`.carriers`): --exact-borders adds border maps instead, and a
    refit (compensation with data) fits the borders itself."""
    if options.exact_borders or options.refits():
        return 0
    cut = options.threshold if options.threshold is not None else plan.cut.get("score")
    if options.threshold is not None and cut is not None:
        cut = float(np.nextafter(cut, -np.inf))  # a threshold removes scores below it only
    held = hold_carriers(plan, ranking.dead, options.block(), cut,
                         {s.id: ranking.unsafe_mask(s) for s in ranking.spaces})
    if held:
        plan.recount()
    return held

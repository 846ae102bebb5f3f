"""What the refit cannot recover: the cost of removing a consumer's input channels when the
channels kept are refit by least squares (:mod:`.reconstruct`), measured on calibration data.

A channel's share of a consumer's output variance (:mod:`.data_importance`) is what is lost
when it is replaced by its mean and nothing else changes. The refit then predicts the removed
channel from the kept ones, so what is really lost is the part of it that the kept channels do
not explain. For a consumer ``y = W x`` (each kernel tap on its own, at one position) with input
covariance ``S`` and ``B = sum_o,t d_o W[o, :, t] W[o, :, t]^T`` (``d_o``: the output weights of
the variance share), the error left after removing the set ``R'`` and refitting on the kept set
``R`` is ``tr(B S) - tr(Q G)`` with ``Q = S_RR^-1`` and ``G = S_R: B S_:R``; removing one more
channel ``c`` from ``R`` adds ``(Q G Q)_cc / Q_cc`` (``tr(Q_cc^-1 (Q G Q)_cc)`` for a block of
entries, the ``H*W`` entries of a flattened channel). Channels are removed greedily, cheapest
first, each scored with what it added (running maximum, so that the scores keep the greedy
order): a channel that another one duplicates costs little while its twin stays, and the twin
then costs what they carried together. (Scored one at a time against all the others, both twins
would look free: on fixtures/plain VGG that cost 7 points of agreement at a 30% MAC cut.)

Cost: ``S`` is a Gram matrix of the consumer's input at ``calibrate``'s sampled positions (rows
x C^2), and the greedy runs at most ``MAX_STEPS`` steps of O(C^2) each (more than one channel a
step past that), so a 2048-wide input costs a few hundred million multiply-adds. A consumer
whose covariance has fewer than ``MIN_ROWS_PER_UNKNOWN`` rows per entry (a classifier after a
global pool, fed one row per sample), or wider than ``WIDEST``, keeps its variance share: there
the covariance of a few hundred samples overstates what a refit recovers on other inputs.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.values import constant_values
from ..ir.weights import axes
from .calibrate import Gram, Patches
from .reconstruct import MIN_ROWS_PER_UNKNOWN, RIDGE

MAX_STEPS = 128  # greedy steps per group; a wider group removes several channels per step
WIDEST = 512  # input entries (per consumer) past which the covariance is not measured (the greedy is O(C^3))


def input_patches(node: gs.Node) -> Patches | None:
    """How the covariance of a consumer's input is sampled: one row per sampled position (a
    Conv's 1x1 patches, a Gemm / MatMul's feature rows); None when it is not measured."""
    found, weight = axes(node), node.inputs[1] if len(node.inputs) > 1 else None
    if found is None or found.transposed_input or found.scatters or not isinstance(weight, gs.Constant):
        return None
    if found.in_channels(weight.shape) > WIDEST:
        return None
    if not found.spatial:
        return Patches()
    rank = len(weight.shape) - 2
    return Patches((1,) * rank, (1,) * rank, (0,) * (2 * rank), (1,) * rank, 1)


def refit_costs(gram: Gram, node: gs.Node, out_weight: np.ndarray, repeat: np.ndarray,
                ridge: float = RIDGE) -> np.ndarray | None:
    """Per input entry of ``node``, its share of the greedy cost of removing its channel when the
    kept ones are refit (module doc), in the units of ``sum_o out_weight[o] * W[o, c]^2 * Var``;
    None when it cannot be measured (then the variance share stands)."""
    found, weight = axes(node), constant_values(node.inputs[1])
    if weight is None or gram.ata is None:
        return None
    d = gram.ata.shape[-1] - 1
    block = int(repeat[0]) if len(repeat) else 1
    rows = np.asarray(weight, np.float64)
    rows = rows if found.out_axis == 0 else np.swapaxes(rows, 0, 1)
    rows = rows.reshape(rows.shape[0], rows.shape[1], -1) * found.scale
    groups = found.groups
    per_in, per_out = rows.shape[1], rows.shape[0] // groups
    if (d != int(repeat.sum()) or np.any(repeat != block) or per_in * groups != d or len(out_weight) != len(rows)
            or per_in % block or gram.rows < MIN_ROWS_PER_UNKNOWN * (per_in + 1)):
        return None
    ata = gram.ata[0]
    count = ata[d, d]
    mean = ata[:d, d] / count
    cov = ata[:d, :d] / count - np.outer(mean, mean)
    out = np.zeros(d)
    for j in range(groups):
        weighted = rows[j * per_out:(j + 1) * per_out] * np.sqrt(np.maximum(
            np.asarray(out_weight[j * per_out:(j + 1) * per_out], np.float64), 0.0))[:, None, None]
        flat = weighted.transpose(0, 2, 1).reshape(-1, per_in)  # [outputs x taps, inputs]
        b = flat.T @ flat  # sum over outputs and taps of d_o W[o, :, t] W[o, :, t]^T
        inputs = slice(j * per_in, (j + 1) * per_in)
        out[inputs] = greedy(cov[inputs, inputs], b, block, ridge)
    return out


def greedy(cov: np.ndarray, b: np.ndarray, block: int, ridge: float = RIDGE) -> np.ndarray:
    """Per entry, the greedy removal cost of its block (of ``block`` entries; the cost spread
    evenly over them) for input covariance ``cov`` and output weighting ``b`` (module doc). The
    ridge (relative to the mean variance, as the refit's) keeps the inverse well conditioned.

    The matrices keep their size: removing entries ``D`` is the rank-|D| update
    ``M -= Q[:, D] Q_DD^-1 M[D]`` of ``Q``, ``A`` and ``A B``, which also zeroes their rows (and
    ``Q``'s columns) of ``D``, so no step copies a C x C matrix."""
    d = len(cov)
    lam = ridge * max(float(np.trace(cov)) / max(d, 1), 1e-30)
    q = np.linalg.inv(cov + lam * np.eye(d))  # S_RR^-1 of the kept entries R (all at first)
    a = q @ cov  # Q S_R: (every entry regressed on the kept ones; not the identity with the ridge:
    # a constant channel's row is zero, so it costs nothing)
    ab = a @ b
    alive = np.ones(d // block, bool)
    per_step = max(1, -(-len(alive) // MAX_STEPS))
    cost, level = np.zeros(d), 0.0
    while alive.any():
        ids = np.flatnonzero(alive)
        if block == 1:
            added = np.einsum("ij,ij->i", ab[ids], a[ids]) / np.diag(q)[ids]
        else:
            added = np.array([np.trace(np.linalg.solve(q[s, s], ab[s] @ a[s].T))
                              for s in (slice(i * block, (i + 1) * block) for i in ids)])
        taken = ids[np.argsort(added, kind="stable")[:per_step]]
        for t, value in zip(taken, np.sort(added, kind="stable")[:per_step]):
            level = max(level, float(value))
            cost[t * block:(t + 1) * block] = level / block
        alive[taken] = False
        if not alive.any():
            break
        drop = (taken[:, None] * block + np.arange(block)).ravel()
        k = q[:, drop] @ np.linalg.inv(q[np.ix_(drop, drop)])
        for m in (a, ab, q):
            m -= k @ m[drop]
    return cost

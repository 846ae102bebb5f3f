"""Data importance scores what the refit cannot recover (passes/recoverable.py): the greedy
removal cost from a consumer's input covariance, checked against a brute-force least-squares
computation, and a channel that another one duplicates costs little while its twin stays."""

from __future__ import annotations

import numpy as np
import pytest

from onnxslim_bn import PruneOptions, inspect
from onnxslim_bn.passes import recoverable
from tests.graphs import Builder


def _error(cov: np.ndarray, b: np.ndarray, removed: list[int]) -> float:
    """What a least-squares refit on the kept entries leaves of ``y = W x`` (weighted by ``b =
    W^T D W``) when the ``removed`` entries are gone: tr(B S) - tr(S_RR^-1 S_R: B S_:R)."""
    kept = [i for i in range(len(cov)) if i not in removed]
    total = float(np.trace(b @ cov))
    if not kept:
        return total
    z = cov[kept]
    return total - float(np.trace(np.linalg.solve(cov[np.ix_(kept, kept)], z @ b @ z.T)))


def _brute_force(cov: np.ndarray, b: np.ndarray, block: int) -> np.ndarray:
    """The greedy of recoverable.greedy, each step's candidates scored by a full solve."""
    blocks = len(cov) // block
    removed: list[int] = []
    cost, level = np.zeros(len(cov)), 0.0
    while len(removed) < blocks:
        base = _error(cov, b, [e for k in removed for e in range(k * block, (k + 1) * block)])
        added = {k: _error(cov, b, [e for j in [*removed, k] for e in range(j * block, (j + 1) * block)]) - base
                 for k in range(blocks) if k not in removed}
        k = min(added, key=lambda j: (added[j], j))
        level = max(level, added[k])
        cost[k * block:(k + 1) * block] = level / block
        removed.append(k)
    return cost


@pytest.mark.parametrize("block", [1, 2])
def test_greedy_costs_equal_a_brute_force_least_squares_greedy(block):
    rng = np.random.default_rng(7)
    mix = rng.standard_normal((8, 8))
    cov = mix @ mix.T / 8 + 0.1 * np.eye(8)
    w = rng.standard_normal((5, 8))
    b = w.T @ np.diag(rng.uniform(0.5, 2.0, 5)) @ w
    got = recoverable.greedy(cov, b, block, ridge=0.0)
    expected = _brute_force(cov, b, block)
    np.testing.assert_allclose(got, expected, rtol=1e-8, atol=1e-12)
    # the first removal costs at most what the variance share says (the refit recovers a part)
    first = int(np.argmin(got))
    assert got[first] * block <= float(np.sum(np.diag(b)[first // block * block:][:block]
                                              * np.diag(cov)[first // block * block:][:block])) + 1e-12


def test_a_duplicated_channel_costs_little_while_its_twin_stays():
    rng = np.random.default_rng(3)
    x = rng.standard_normal((4000, 3))
    x = np.column_stack([x[:, 0], x[:, 0] + 0.01 * rng.standard_normal(4000), x[:, 1], x[:, 2]])
    cov = np.cov(x, rowvar=False)
    b = np.eye(4)
    got = recoverable.greedy(cov, b, 1)
    twins = sorted(got[:2])
    assert twins[0] < 1e-2  # one twin is nearly free: the other predicts it (the ridge leaves a little)
    assert twins[1] > 0.9  # then the pair's signal is lost: about its variance (1)
    assert got[2] > 0.9 and got[3] > 0.9


def _twin_model():
    """conv -> BN -> relu whose channels 0 and 1 are the same (equal weights and BN), then a 3x3
    conv reading them."""
    b = Builder(seed=11)
    w = b.rng.standard_normal((6, 3, 3, 3)).astype(np.float32) * 0.3
    w[1] = w[0]
    conv = b.op("Conv", ["input", b.const(w, "w")], kernel_shape=[3, 3], pads=[1] * 4)
    gamma = b.rng.uniform(0.5, 1.5, 6).astype(np.float32)
    beta = b.rng.standard_normal(6).astype(np.float32) * 0.5
    mean, var = np.zeros(6, np.float32), np.ones(6, np.float32)
    gamma[1], beta[1] = gamma[0], beta[0]
    bn = b.op("BatchNormalization", [conv, *(b.const(p, "bn") for p in (gamma, beta, mean, var))], epsilon=1e-5)
    h = b.op("Relu", [bn])
    out = b.conv(h, 6, 4)
    return b.model({"input": [None, 3, 8, 8]}, [out], {out: [None, 4, 8, 8]})


def test_data_importance_scores_one_twin_near_zero_and_the_other_as_a_live_channel():
    data = {"input": np.random.default_rng(5).standard_normal((64, 3, 8, 8)).astype(np.float32)}
    found = inspect(_twin_model(), options=PruneOptions(data=data, importance="data"))
    space = next(s for s in found.spaces if s.channels == 6 and s.scores)
    scores = np.array(space.scores)
    low, high = sorted(scores[:2])
    others = scores[2:]
    assert low < 1e-2 * others.min()  # the twin the other one predicts: nearly free (the ridge leaves a little)
    assert high > 0.5 * others.min()  # the one left carries both: not free


def test_a_constant_channel_costs_nothing_with_the_ridge():
    rng = np.random.default_rng(4)
    x = rng.standard_normal((2000, 4))
    x[:, 2] = 0.7  # a dead channel: its constant output (beta) is all it carries
    cov = np.cov(x, rowvar=False)
    got = recoverable.greedy(cov, np.diag([1.0, 2.0, 50.0, 1.0]), 1)
    assert got[2] == 0.0 or got[2] < 1e-12
    assert got[[0, 1, 3]].min() > 0.5

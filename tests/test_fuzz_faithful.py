"""Fuzz for issue 16's classes, on the random graphs of tests/test_fuzz.py.

- Default widths (``--round-to auto``, ``--min-channels 4``): a ``--threshold`` run never removes
  a channel scored above the threshold, and a ``--ratio`` run inside the dead fraction removes a
  live channel only in place of a dead one that a constraint kept (rounding goes up, or down
  through dead channels only); both stay exact with ``exact_borders``.
- Zero stays zero: with beta = 0 on every dead channel, no dead channel is held back for an
  unknown replacement value, unless the graph has a block of ``NOT_CONSTANT``.
"""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from onnxslim_bn import BnSlimError, prune
from tests.graphs import random_input, run
from tests.test_fuzz import BLOCKS, EXAMPLES, HEADS, Net

# blocks whose dead channels may meet a non-constant value legitimately: a Pad writing 0.5, a conv
# that never had a BN, and reader BNs (their dead channel is dead on their branch only: the raw
# reader of the shared tensor sees it live)
NOT_CONSTANT = {"pad-value", "plain", "preact", "reader-concat"}


@st.composite
def drawn_networks(draw):
    opset = draw(st.sampled_from([11, 13, 17]))
    size = draw(st.sampled_from([4, 6]))
    net = Net(draw, opset, size)
    kinds = draw(st.lists(st.sampled_from(BLOCKS), min_size=1, max_size=5))
    for kind in kinds:
        net.block(kind)
    out = net.head(draw(st.sampled_from(HEADS)))
    return net.b.model({"x": [2, 3, size, size]}, [out]), [2, 3, size, size], net.size, net.beta_dead, set(kinds)


def _exact(model, pruned, shape, final_size) -> None:
    x = random_input(shape)
    want, got = run(model, {"x": x})[0], run(pruned, {"x": x})[0]
    tolerance = 1e-5 * float(np.abs(want).max()) * max(1.0, final_size**2 / 256) + 1e-6
    np.testing.assert_allclose(got, want, atol=tolerance, rtol=0)


@settings(max_examples=max(EXAMPLES // 2, 50), deadline=None, derandomize="FUZZ_EXAMPLES" not in os.environ,
          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(drawn_networks(), st.floats(0.2, 0.9))
def test_default_widths_never_remove_live_channels_and_zero_stays_zero(drawn, share):
    model, shape, final_size, beta_dead, kinds = drawn
    try:
        exact = prune(model, threshold=1e-6, min_channels=1, round_to=1, exact_borders=True, verify=False)
    except BnSlimError:
        event("nothing prunable")
        return
    sel = exact.report.selection
    if beta_dead == 0.0 and not kinds & NOT_CONSTANT:
        assert sel["kept_unknown_replacement"] == 0, (kinds, sel)
    dead = exact.report.chosen_channels
    default = prune(model, threshold=1e-6, exact_borders=True, verify=False)
    assert default.report.selection["max_removed_score"] in (None, 0.0), default.report.selection
    _exact(model, default.model, shape, final_size)
    if dead and sel["ranked"]:
        ratio = share * dead / sel["ranked"]
        if ratio > 0:
            inside = prune(model, ratio=ratio, exact_borders=True, verify=False)
            # a live channel goes only in place of a dead one a constraint kept (--ratio counts channels);
            # rounding never spends one
            passed = inside.report.selection
            assert passed["live_removed"] <= passed["kept_by_min_channels"] + passed["kept_by_layer_cap"], passed
            _exact(model, inside.model, shape, final_size)
            event("ratio inside the dead fraction")

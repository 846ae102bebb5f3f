"""Property-based fuzz of the one-preparation pipeline (issue 20): on the random graphs of
tests/test_fuzz.py, one :class:`Pipeline` cuts the model with options A, then B, then A again,
and each cut must equal a fresh :func:`prune` with the same options -- the model byte for byte,
the report's numbers (chosen channels, MACs, check figures) alike -- and the prepared graph must
export as it did before the cuts. A field the checkpoint (``ir.values.restored``) missed would
show as a second cut that differs from a fresh run. ``FUZZ_PIPELINE_EXAMPLES`` runs more (and
fresh random) examples."""

from __future__ import annotations

import os
import re

import numpy as np
import onnx_graphsurgeon as gs
from hypothesis import HealthCheck, Phase, event, given, note, settings
from hypothesis import strategies as st

from onnxslim_bn import BnSlimError, prune
from onnxslim_bn.app.api import prune_prepared
from onnxslim_bn.app.pipeline import Pipeline
from onnxslim_bn.options import PruneOptions
from tests.test_fuzz import networks

EXAMPLES = int(os.environ.get("FUZZ_PIPELINE_EXAMPLES", "40"))


def _exported(graph: gs.Graph) -> bytes:
    return gs.export_onnx(graph, do_type_check=False).SerializeToString()


def _untimed(value):
    """``value`` without its timings (keys naming seconds, "1.2 s" in notes), which no two runs share."""
    if isinstance(value, dict):
        return {k: _untimed(v) for k, v in value.items() if "seconds" not in k}
    if isinstance(value, list):
        return [_untimed(v) for v in value]
    return re.sub(r"\d+\.\d+ s\b", "<time> s", value) if isinstance(value, str) else value


def _numbers(report) -> dict:
    """The report without its timings: every figure a run computes."""
    return _untimed(report.to_dict())


def _outcome(run, options: PruneOptions):
    """The run's model bytes and report numbers, or the one line it refused with."""
    try:
        result = run(options)
    except BnSlimError as err:
        return "refused", str(err)
    return result.model.SerializeToString(), _numbers(result.report)


@st.composite
def option_pairs(draw, shape):
    """Two option sets that prepare alike (one Pipeline serves both): budgets by ratio or MACs,
    exact borders on or off, with or without --data arrays (shared by both, as a sweep does)."""
    common = {"min_channels": 1, "seed": draw(st.integers(0, 3))}
    if draw(st.booleans()):
        samples = np.random.default_rng(0).standard_normal((16, *shape[1:])).astype(np.float32)
        common.update(data={"x": samples}, calibration_samples=8,
                      importance=draw(st.sampled_from(["gamma", "data"])),
                      compensation=draw(st.sampled_from(["bias", "reconstruct"])))

    def one():
        budget = draw(st.sampled_from([{"ratio": draw(st.sampled_from([0.25, 0.5, 0.75]))},
                                       {"target_macs": draw(st.sampled_from([0.5, 0.8]))},
                                       {"threshold": 1e-6}]))
        return PruneOptions(**common, **budget, exact_borders=draw(st.booleans()),
                            round_to=draw(st.sampled_from([1, 2])))

    return one(), one()


@settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_PIPELINE_EXAMPLES" not in os.environ,
          database=None, phases=[Phase.explicit, Phase.generate], suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.data())
def test_cuts_on_one_preparation_equal_fresh_runs(data):
    model, shape, _ = data.draw(networks())
    a, b = data.draw(option_pairs(shape))
    note(" ".join(f"{n.op_type}({','.join(n.input)})->{','.join(n.output)}" for n in model.graph.node))
    shared = Pipeline(model)
    outcomes = [_outcome(lambda o: prune_prepared(shared, o), options) for options in (a, b, a)]
    prep = shared._first
    for options, got in zip((a, b, a), outcomes):
        assert got == _outcome(lambda o: prune(model, o), options), options
    event("refused" if outcomes[0][0] == "refused" else "cut")
    if prep is not None:  # the graph as analysed, after every cut
        fresh = Pipeline(model).prepared(a)
        assert _exported(prep.graph) == _exported(fresh.graph)

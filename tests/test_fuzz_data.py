"""The fuzz of tests/test_fuzz.py with importance from data: random graphs (gates, pads,
padding-counting pools, layers that never had a BN, concatenations, grouped and transposed
convs, five heads, fp16 weights behind Casts, If nodes reading outer-scope tensors) pruned to a
MAC budget with --data, with bias folding and with
reconstruction. Live channels go, so nothing is exact: the invariants are that the run ends in
a valid model (the checker, shape inference and the onnxruntime check run inside prune), with
the input's interface, finite outputs of the original's shapes, no more MACs than the budget
allows, nothing blocked that gamma would prune, and fp16 storage kept without growth."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from onnxslim_bn import BnSlimError, prune
from onnx import TensorProto

from tests.test_fuzz import assert_storage_kept, networks
from tests.graphs import run

EXAMPLES = int(os.environ.get("FUZZ_DATA_EXAMPLES", "300"))


@settings(max_examples=EXAMPLES, deadline=None, derandomize="FUZZ_DATA_EXAMPLES" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks(), st.sampled_from([0.5, 0.8]), st.sampled_from(["bias", "reconstruct"]))
def test_random_graphs_prune_with_data_to_valid_models(drawn, target, compensation):
    model, shape, _ = drawn
    note(" ".join(f"{n.op_type}({','.join(n.input)})->{','.join(n.output)}" for n in model.graph.node))
    rng = np.random.default_rng(0)
    samples = rng.standard_normal((64, *shape[1:])).astype(np.float32)  # fixed batch 2: 32 runs
    x = samples[:2]
    original = run(model, {"x": x})[0]
    try:
        result = prune(model, target_macs=target, importance="data", compensation=compensation, min_channels=1,
                       data={"x": samples}, calibration_samples=48)
    except BnSlimError as err:  # legitimate only when nothing at all can be pruned
        assert "blocked" in str(err) or "nothing to prune" in str(err), err
        event("nothing prunable")
        return
    event(f"{compensation}: removed {'some' if result.report.removed_channels else 'none'}")
    if any(n.op_type == "If" for n in model.graph.node):
        event(f"{compensation}: an If reading outer-scope tensors")
    if any(t.data_type == TensorProto.FLOAT16 for t in model.graph.initializer):
        event(f"{compensation}: fp16 weights behind Casts")
        assert_storage_kept(model, result.model)
    got = run(result.model, {"x": x})[0]
    assert got.shape == original.shape and np.isfinite(got).all()
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    budget = result.report.selection["budget"]
    assert result.report.after.macs <= result.report.before.macs
    if not budget.get("unreachable"):
        assert budget["reached"] <= target + 1e-9, budget

"""The fuzz of tests/test_fuzz.py with importance from data: random graphs (gates, pads,
padding-counting pools, layers that never had a BN, concatenations, grouped and transposed
convs, five heads) pruned to a MAC budget with --data, with bias folding and with
reconstruction. Live channels go, so nothing is exact: the invariants are that the run ends in
a valid model (the checker, shape inference and the onnxruntime check run inside prune), with
the input's interface, finite outputs of the original's shapes, no more MACs than the budget
allows, and nothing blocked that gamma would prune."""

from __future__ import annotations

import os

import numpy as np
from hypothesis import HealthCheck, event, given, note, settings
from hypothesis import strategies as st

from onnxslim_bn import BnSlimError, prune
from tests.test_fuzz import networks
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
    got = run(result.model, {"x": x})[0]
    assert got.shape == original.shape and np.isfinite(got).all()
    assert [i.name for i in result.model.graph.input] == [i.name for i in model.graph.input]
    assert [o.name for o in result.model.graph.output] == [o.name for o in model.graph.output]
    budget = result.report.selection["budget"]
    assert result.report.after.macs <= result.report.before.macs
    if not budget.get("unreachable"):
        assert budget["reached"] <= target + 1e-9, budget


def _fold_bns(model):
    """The same function with every BatchNormalization that is the only reader of a Conv with
    constant weights folded into that Conv (as torch.onnx.export does): W * s, (b - mean) * s + beta."""
    import onnx
    from onnx import numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {t.name: t for t in graph.initializer}
    readers: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            readers[name] = readers.get(name, 0) + 1
    producer = {o: n for n in graph.node for o in n.output}
    for bn in [n for n in graph.node if n.op_type == "BatchNormalization"]:
        conv = producer.get(bn.input[0])
        if conv is None or conv.op_type != "Conv" or readers.get(bn.input[0]) != 1 or conv.input[1] not in inits \
                or any(name not in inits for name in bn.input[1:5]) or readers.get(conv.input[1]) != 1:
            continue
        gamma, beta, mean, var = (numpy_helper.to_array(inits[n]).astype(np.float64) for n in bn.input[1:5])
        eps = next((a.f for a in bn.attribute if a.name == "epsilon"), 1e-5)
        s = gamma / np.sqrt(var + eps)
        w = numpy_helper.to_array(inits[conv.input[1]]).astype(np.float64)
        b = numpy_helper.to_array(inits[conv.input[2]]).astype(np.float64) if len(conv.input) > 2 and conv.input[2] \
            else np.zeros(w.shape[0])
        inits[conv.input[1]].CopyFrom(numpy_helper.from_array((w * s[:, None, None, None]).astype(np.float32),
                                                              conv.input[1]))
        bias_name = f"{conv.input[1]}_folded_bias"
        graph.initializer.append(numpy_helper.from_array(((b - mean) * s + beta).astype(np.float32), bias_name))
        del conv.input[2:]
        conv.input.append(bias_name)
        conv.output[0] = bn.output[0]
        graph.node.remove(bn)
    return out


@settings(max_examples=max(10, EXAMPLES // 10), deadline=None, derandomize="FUZZ_DATA_EXAMPLES" not in os.environ,
          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks())
def test_random_graphs_and_their_folded_export_get_the_same_data_scores(drawn):
    """Issue 17: the cost of a channel at a consumer does not depend on whether the BN after the
    consumer was kept or folded into it (each output's variance counts as one)."""
    from onnxslim_bn import inspect
    from onnxslim_bn.plan import PruneOptions

    model, shape, _ = drawn
    for i, node in enumerate(model.graph.node):  # the spaces are matched by their layer's name
        node.name = node.name or f"node{i}"
    folded = _fold_bns(model)
    note(" ".join(f"{n.op_type}({','.join(n.input)})->{','.join(n.output)}" for n in folded.graph.node))
    if len(folded.graph.node) == len(model.graph.node):
        event("no Conv-BN pair to fold")
        return
    samples = np.random.default_rng(0).standard_normal((48, *shape[1:])).astype(np.float32)
    np.testing.assert_allclose(run(folded, {"x": samples[:2]})[0], run(model, {"x": samples[:2]})[0],
                               rtol=1e-4, atol=1e-4 * float(np.abs(run(model, {"x": samples[:2]})[0]).max()))
    scores = []
    for m in (model, folded):
        options = PruneOptions(ratio=0.3, importance="data", data={"x": samples}, calibration_samples=32, min_channels=1)
        try:
            found = inspect(m, options=options)
        except BnSlimError:
            return
        scores.append({s.producers[0]: np.array(s.scores) for s in found.spaces if s.scores and s.blocked is None})
    common = [k for k in scores[0] if k in scores[1] and len(scores[0][k]) == len(scores[1][k])]
    event(f"{min(len(common), 3)}+ spaces compared" if len(common) >= 3 else f"{len(common)} spaces compared")
    for k in common:
        a, b = scores[0][k], scores[1][k]
        finite = np.isfinite(a) & np.isfinite(b)
        assert (np.isfinite(a) == np.isfinite(b)).all(), k
        np.testing.assert_allclose(b[finite], a[finite], rtol=1e-3, atol=1e-9, err_msg=k)

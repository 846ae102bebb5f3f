"""The fuzz of tests/test_fuzz.py with importance from data: random graphs (gates, pads,
padding-counting pools, layers that never had a BN, concatenations, grouped and transposed
convs, five heads, fp16 weights behind Casts, If nodes reading outer-scope tensors) pruned to a
MAC budget with --data, with bias folding and with
reconstruction. Live channels go, so nothing is exact: the invariants are that the run ends in
a valid model (the checker, shape inference and the onnxruntime check run inside prune), with
the input's interface, finite outputs of the original's shapes, no more MACs than the budget
allows, nothing blocked that gamma would prune, and fp16 storage kept without growth.

The same graphs also get NaN / Inf-bearing data (refused in one line naming the sample) and a
Resize sized from a scalar input in front (shapes inference cannot follow; every layer's MACs
must still be counted)."""

from __future__ import annotations

import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from hypothesis import HealthCheck, assume, event, given, note, settings
from hypothesis import strategies as st
from onnx import TensorProto, helper

from onnxslim_bn import BnSlimError, prune
from onnxslim_bn.ir.fold import fold_constants
from onnxslim_bn.ir.shapes import infer_shapes
from onnxslim_bn.passes.metrics import measure
from tests.graphs import fold_bns, run
from tests.test_fuzz import assert_storage_kept, networks, never_larger

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
    try:  # no larger than the input, or declined in one line (issue 16)
        result = never_larger(model, target_macs=target, importance="data", compensation=compensation, min_channels=1,
                              data={"x": samples}, calibration_samples=48)
    except BnSlimError as err:  # legitimate only when nothing at all can be pruned, or as growth (issue 16:
        if "would exceed the input's" in str(err):  # a weight sliced for its layer, read whole in an If)
            event("declined to write a larger model")
            return
        assert "blocked" in str(err) or "nothing to prune" in str(err), err
        event("nothing prunable")
        return
    if result is None:
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


# ---------------------------------------------------------------------- bad data, unresolved shapes

BAD_EXAMPLES = int(os.environ.get("FUZZ_DATA_BAD_EXAMPLES", "60"))


@settings(max_examples=BAD_EXAMPLES, deadline=None, derandomize="FUZZ_DATA_EXAMPLES" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks(), st.integers(0, 63), st.sampled_from([np.nan, np.inf, -np.inf]),
       st.sampled_from(["bias", "reconstruct"]))
def test_random_graphs_refuse_nan_bearing_data_in_one_line(drawn, sample, bad, compensation):
    """One non-finite value anywhere in the data: refused where it enters, naming the input and the
    sample, whatever the graph (nothing is calibrated, ranked or refit on it)."""
    model, shape, _ = drawn
    samples = np.random.default_rng(0).standard_normal((64, *shape[1:])).astype(np.float32)
    position = tuple(int(i) for i in np.random.default_rng(sample).integers(0, shape[1:]))
    samples[(sample, *position)] = bad
    try:
        prune(model, target_macs=0.5, importance="data", compensation=compensation, min_channels=1,
              data={"x": samples}, calibration_samples=48)
    except BnSlimError as err:
        assert f"array 'x' holds {'NaN' if np.isnan(bad) else 'Inf'} in sample {sample} " in str(err), err
        assert "\n" not in str(err)
        return
    raise AssertionError("non-finite data was accepted")


def _resized(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` behind a Resize of its input by a scalar input ``s`` (scales [1, 1, s, s]): with
    s = 1 it computes the same, but shape inference cannot follow the spatial dims any more."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    for node in graph.node:
        node.input[:] = ["x_resized" if i == "x" else i for i in node.input]
    opset = next(o.version for o in out.opset_import if o.domain in ("", "ai.onnx"))
    ones = helper.make_tensor("resize_ones", TensorProto.FLOAT, [2], [1.0, 1.0])
    if opset >= 13:
        axes = helper.make_tensor("resize_axes", TensorProto.INT64, [1], [0])
        graph.initializer.extend([ones, axes])
        unsqueeze = helper.make_node("Unsqueeze", ["s", "resize_axes"], ["s1"], name="resize_unsqueeze")
        roi = ""
    else:  # opset 11-12: roi is a required input (an empty one: only tf_crop_and_resize reads it)
        graph.initializer.extend([ones, helper.make_tensor("resize_roi", TensorProto.FLOAT, [0], [])])
        unsqueeze = helper.make_node("Unsqueeze", ["s"], ["s1"], name="resize_unsqueeze", axes=[0])
        roi = "resize_roi"
    front = [unsqueeze, helper.make_node("Concat", ["resize_ones", "s1", "s1"], ["scales"], name="resize_scales", axis=0),
             helper.make_node("Resize", ["x", roi, "scales"], ["x_resized"], name="resize_input", mode="nearest")]
    nodes = front + list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.input.append(helper.make_tensor_value_info("s", TensorProto.FLOAT, []))
    onnx.checker.check_model(out, full_check=True)
    return out


@settings(max_examples=BAD_EXAMPLES, deadline=None, derandomize="FUZZ_DATA_EXAMPLES" not in os.environ, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks(), st.sampled_from(["bias", "reconstruct"]))
def test_random_graphs_behind_an_unresolvable_resize_count_every_layer(drawn, compensation):
    """The same graphs behind a Resize sized from a scalar input (identity at s = 1): shape
    inference loses the spatial dims, yet every layer's MACs are counted (from a run), so the
    original's MACs are those of the graph without the Resize, and the run ends in a valid model
    or one line."""
    model, shape, _ = drawn
    assume(next(o.version for o in model.opset_import if o.domain in ("", "ai.onnx")) >= 11)
    wrapped = _resized(model)
    note(" ".join(f"{n.op_type}({','.join(n.input)})->{','.join(n.output)}" for n in wrapped.graph.node))
    samples = np.random.default_rng(0).standard_normal((64, *shape[1:])).astype(np.float32)
    one = np.array(1.0, np.float32)
    plain = gs.import_onnx(model)
    fold_constants(plain)  # weights stored as fp16 behind a Cast (networks() draws them) are the layers' weights
    reference = measure(plain, infer_shapes(model, {}, "drawn"), 0)
    try:
        result = prune(wrapped, target_macs=0.6, importance="data", compensation=compensation, min_channels=1,
                       data={"x": samples, "s": one}, calibration_samples=48)
    except BnSlimError as err:  # legitimate only when nothing at all can be pruned, or as growth (issue 16)
        assert "\n" not in str(err)
        if "would exceed the input's" in str(err):  # the cut's added tensors outweigh what it removed
            event("declined to write a larger model")
            return
        assert "blocked" in str(err) or "nothing to prune" in str(err), err
        event("nothing prunable")
        return
    assert result.report.before.macs == reference.macs
    assert any("shape inference cannot resolve" in n for n in result.report.notes)
    x = samples[:2]
    original, got = run(wrapped, {"x": x, "s": one})[0], run(result.model, {"x": x, "s": one})[0]
    assert got.shape == original.shape and np.isfinite(got).all()
    budget = result.report.selection["budget"]
    assert result.report.after.macs <= result.report.before.macs
    if not budget.get("unreachable"):
        assert budget["reached"] <= 0.6 + 1e-9, budget


@settings(max_examples=max(10, EXAMPLES // 10), deadline=None, derandomize="FUZZ_DATA_EXAMPLES" not in os.environ,
          database=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(networks())
def test_random_graphs_and_their_folded_export_get_the_same_data_scores(drawn):
    """Issue 17: the cost of a channel at a consumer does not depend on whether the BN after the
    consumer was kept or folded into it (each output's variance counts as one)."""
    from onnxslim_bn import inspect
    from onnxslim_bn.options import PruneOptions

    model, shape, _ = drawn
    for i, node in enumerate(model.graph.node):  # the spaces are matched by their layer's name
        node.name = node.name or f"node{i}"
    producers = {o: n.op_type for n in model.graph.node for o in n.output}
    if any(n.op_type == "BatchNormalization" and producers.get(n.input[0]) == "Concat" for n in model.graph.node):
        # issue 17: a reader BN after a concatenation (DenseNet) scored its branch apart in the folded
        # export only (the folded layers' replacement was unknown when the branch was chosen)
        event("reader BN after a Concat")
    folded = fold_bns(model)
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
    # the same layers ranked (a folded layer's space blocked in one export only: the Tanh branch of a
    # reader-BN concatenation once was), by the same scores
    assert sorted(scores[0]) == sorted(scores[1])
    common = [k for k in scores[0] if k in scores[1] and len(scores[0][k]) == len(scores[1][k])]
    event(f"{min(len(common), 3)}+ spaces compared" if len(common) >= 3 else f"{len(common)} spaces compared")
    for k in common:
        a, b = scores[0][k], scores[1][k]
        finite = np.isfinite(a) & np.isfinite(b)
        assert (np.isfinite(a) == np.isfinite(b)).all(), k
        np.testing.assert_allclose(b[finite], a[finite], rtol=1e-3, atol=1e-9, err_msg=k)

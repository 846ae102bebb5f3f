"""Issue 18, the refit and the storage of weights: the refit edits the weights the plan owns
(names, --keep, initializer-inputs, border maps), streams with bounded memory, follows control
flow; fp16 weights behind a Cast keep their storage type; weights read inside If branches."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_bn import BnSlimError, prune
from onnxslim_bn.app.report import export_widths
from onnxslim_bn.ir.interface import account, check_size
from onnxslim_bn.ir.model_io import weight_bytes
from onnxslim_bn.passes import reconstruct as rec

from .graphs import Builder, fp16_behind_casts, random_input, run, without_carriers

H = 8


def _chain(seed: int = 3, dead: np.ndarray | None = None, width: int = 16, size: int = H, k: int = 3) -> onnx.ModelProto:
    """conv3x3 -> BN (``dead``: gamma 0, random beta) -> ReLU -> conv k x k -> BN -> ReLU -> conv3x3."""
    b = Builder(seed=seed)
    x = b.op("Relu", [b.bn(b.conv("x", 3, width, k=3), width, dead=dead, beta_dead=None)])
    y = b.op("Relu", [b.bn(b.conv(x, width, width, k=k), width)])
    return b.model({"x": [None, 3, size, size]}, [b.conv(y, width, 4, k=3)])


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def _inits(model: onnx.ModelProto) -> dict[str, np.ndarray]:
    return {t.name: numpy_helper.to_array(t) for t in model.graph.initializer}


DATA = {"x": random_input([96, 3, H, H], seed=1)}
TEST = {"x": random_input([16, 3, H, H], seed=9)}


# ------------------------------------------------------------------------------ names and --keep
def test_refit_keeps_weight_names_and_widths_point_at_real_initializers():
    model = _chain()
    folded = prune(model, ratio=0.3, round_to=1, compensation="bias")
    refit = prune(model, ratio=0.3, round_to=1, data=DATA, importance="gamma")  # the same channels
    assert refit.reconstruction is not None and len(refit.reconstruction.layers) == 2
    names = set(_inits(refit.model))
    assert not any("refit" in n for n in names)
    for layer in export_widths(refit.report)["layers"]:  # what examples/finetune_from_widths.py reads
        assert layer["weight"] in names
    # the same weights as bias folding wrote, under the same names, now with refit values
    assert {n for n in _inits(folded.model) if n.startswith("w")} == {n for n in names if n.startswith("w")}
    changed = [n for n in names if n.startswith("w") and not np.array_equal(_inits(folded.model)[n], _inits(refit.model)[n])]
    assert len(changed) == 2


def test_refit_never_touches_a_layer_protected_with_keep():
    model = _chain()
    convs = [n for n in model.graph.node if n.op_type == "Conv"]
    kept = convs[1]
    folded = prune(model, ratio=0.3, round_to=1, compensation="bias", keep=[kept.name])
    refit = prune(model, ratio=0.3, round_to=1, data=DATA, keep=[kept.name], importance="gamma")
    assert kept.name not in [f.node for f in refit.reconstruction.layers]
    assert (kept.name, "protected with --keep") in refit.reconstruction.skipped
    node = next(n for n in refit.model.graph.node if n.name == kept.name)
    for name in node.input[1:]:  # exactly what bias folding left
        np.testing.assert_array_equal(_inits(refit.model)[name], _inits(folded.model)[name])
    assert [f.node for f in refit.reconstruction.layers] == [convs[2].name]  # its reader's input changed: refit


def test_refit_keeps_an_initializer_input_overridable():
    """A weight listed as a graph input too: the refit writes it in place, so feeding the input
    still changes the output (and the refit values are its default)."""
    model = _chain()
    consumer = [n for n in model.graph.node if n.op_type == "Conv"][1]
    weight = next(t for t in model.graph.initializer if t.name == consumer.input[1])
    model.graph.input.append(helper.make_tensor_value_info(weight.name, TensorProto.FLOAT, list(weight.dims)))
    result = prune(model, ratio=0.3, round_to=1, data=DATA)
    assert consumer.name in [f.node for f in result.reconstruction.layers]
    pruned = result.model
    assert weight.name in [i.name for i in pruned.graph.input]
    default = _inits(pruned)[weight.name]
    declared = next(i for i in pruned.graph.input if i.name == weight.name)
    assert [d.dim_value for d in declared.type.tensor_type.shape.dim] == list(default.shape)
    base = run(pruned, TEST)[0]
    np.testing.assert_array_equal(run(pruned, {**TEST, weight.name: default})[0], base)
    fed = run(pruned, {**TEST, weight.name: np.zeros_like(default)})[0]
    assert np.abs(fed - base).max() > 0.1


# -------------------------------------------------------------------------------- border maps
def test_refit_is_as_exact_as_exact_borders_when_the_removed_channels_were_constant():
    """Dead channels (gamma 0, beta != 0) into a padded consumer: the refit keeps the border map
    (it fits in what the cut saved) and is as exact as bias folding with --exact-borders."""
    model = _chain(seed=5, dead=np.arange(0, 32, 2), width=32, size=6)
    data, test = {"x": random_input([96, 3, 6, 6], seed=1)}, {"x": random_input([16, 3, 6, 6], seed=9)}
    want = run(model, test)[0]
    options = dict(threshold=1e-3, round_to=1, importance="gamma")
    exact = _rel(run(prune(model, compensation="bias", exact_borders=True, **options).model, test)[0], want)
    plain = _rel(run(prune(model, compensation="bias", **options).model, test)[0], want)
    result = prune(model, data=data, **options)
    refit = _rel(run(result.model, test)[0], want)
    assert plain < 1e-6 and exact < 1e-6  # a kept dead channel carries them (select.carriers), or the map
    assert refit <= 2 * exact + 1e-7, (refit, exact)
    assert result.reconstruction.maps_kept == 1 and result.reconstruction.maps_dropped == 0
    assert weight_bytes(result.model) <= weight_bytes(model)


def test_refit_leaves_out_a_border_map_that_would_grow_the_model_and_says_so(monkeypatch):
    without_carriers(monkeypatch)  # the refit against bias folding's border error
    model = _chain(dead=np.array([1, 5, 9, 12]), size=10)
    data, test = {"x": random_input([96, 3, 10, 10], seed=1)}, {"x": random_input([16, 3, 10, 10], seed=9)}
    options = dict(threshold=1e-3, round_to=1, importance="gamma")
    result = prune(model, data=data, **options)
    assert result.reconstruction.maps_too_large == 1 and weight_bytes(result.model) <= weight_bytes(model)
    assert any("--exact-borders keeps them" in n for n in result.report.notes)
    assert not any(n.op_type == "Add" for n in result.model.graph.node)
    want = run(model, test)[0]  # still closer than bias folding alone
    assert _rel(run(result.model, test)[0], want) < _rel(run(prune(model, compensation="bias", **options).model,
                                                              test)[0], want)
    # asked for: kept (larger than the input, as --exact-borders makes it) and exact
    asked = prune(model, data=data, exact_borders=True, **options)
    assert asked.reconstruction.maps_kept == 1 and _rel(run(asked.model, test)[0], want) < 1e-6


# ------------------------------------------------------------------------------ bounded memory
def test_refit_streams_through_a_store_that_spills_to_files(monkeypatch):
    """With a store of 1 KiB everything goes to files: the same refit, bit for bit, and
    nothing held in memory past the budget."""
    model = _chain()
    pruned = prune(model, ratio=0.3, round_to=1, compensation="bias").model
    calib = {"x": random_input([40, 3, H, H], seed=1)}
    in_memory, report = rec.reconstruct(model, pruned, calib)
    assert report.spilled_bytes == 0
    held = []
    original_put = rec._Store.put

    def put(self, name, index, value):
        original_put(self, name, index, value)
        held.append(self.held)

    monkeypatch.setattr(rec, "STORE_BYTES", 1024)
    monkeypatch.setattr(rec._Store, "put", put)
    spilled, report = rec.reconstruct(model, pruned, calib)
    assert report.spilled_bytes > 100_000 and max(held) <= 1024
    for name, value in _inits(in_memory).items():
        np.testing.assert_array_equal(_inits(spilled)[name], value)


def test_refit_memory_does_not_grow_with_the_sample_count(monkeypatch):
    """What the refit holds between levels (activations and target rows) stays within the
    store's budget at 256 and at 1,000 samples (here 256 KiB; the default is STORE_BYTES); the
    Gram matrices are reducers. Peak RSS at ResNet-50 size: scripts/reconstruct_bench.py."""
    model = _chain(width=8)
    pruned = prune(model, ratio=0.3, round_to=1, compensation="bias").model
    monkeypatch.setattr(rec, "STORE_BYTES", 2**18)
    peaks, spills = {}, {}
    for n in (256, 1000):
        store_peak = []
        original_put = rec._Store.put

        def put(self, name, index, value, _peak=store_peak):
            original_put(self, name, index, value)
            _peak.append(self.held)

        monkeypatch.setattr(rec._Store, "put", put)
        _, report = rec.reconstruct(model, pruned, {"x": random_input([n, 3, H, H], seed=1)})
        monkeypatch.setattr(rec._Store, "put", original_put)
        assert len(report.layers) == 2
        peaks[n] = max(store_peak)
        spills[n] = report.spilled_bytes
    assert max(peaks.values()) <= 2**18  # what stays in memory: the budget, whatever the count
    assert spills[1000] > 3 * spills[256] > 0  # the rest went to files


# ------------------------------------------------------------------------------- control flow
def _if_model(case: str) -> onnx.ModelProto:
    """conv -> BN (dead channels) -> ReLU -> conv2 -> BN -> ReLU -> [If] -> conv. ``weight``: the
    If's branches reduce conv2's weight (an outer-scope read of a weight the cut slices);
    ``activation``: the If scales the activation by the mean of the graph input, read inside."""
    b = Builder(seed=2)
    x = b.op("Relu", [b.bn(b.conv("x", 3, 8, k=3), 8, dead=np.array([1, 4]), beta_dead=None)])
    conv2 = b.conv(x, 8, 8, k=3)
    w2 = b.nodes[-1].input[1]
    y = b.op("Relu", [b.bn(conv2, 8)])
    cond = b.const(np.array(True), "cond")
    if case == "weight":
        then = helper.make_graph([helper.make_node("ReduceSum", [w2], ["t_out"], keepdims=0)], "then", [],
                                 [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, [])])
        other = helper.make_graph([helper.make_node("ReduceMax", [w2], ["e_out"], keepdims=0)], "else", [],
                                  [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, [])])
        s = b.name("s")
        b.nodes.append(helper.make_node("If", [cond], [s], then_branch=then, else_branch=other, name="If_w"))
        y = b.op("Add", [y, s])
    else:
        then = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["xm"], keepdims=0),
                                  helper.make_node("Mul", [y, "xm"], ["t_out"])], "then", [],
                                 [helper.make_tensor_value_info("t_out", TensorProto.FLOAT, None)])
        other = helper.make_graph([helper.make_node("Identity", [y], ["e_out"])], "else", [],
                                  [helper.make_tensor_value_info("e_out", TensorProto.FLOAT, None)])
        s = b.name("s")
        b.nodes.append(helper.make_node("If", [cond], [s], then_branch=then, else_branch=other, name="If_y"))
        y = b.op("Relu", [s])
    return b.model({"x": [None, 3, H, H]}, [b.conv(y, 8, 4, k=3)])


def test_a_weight_read_inside_an_if_branch_is_copied_before_slicing():
    model = _if_model("weight")
    w2 = [n for n in model.graph.node if n.op_type == "Conv"][1].input[1]
    full = _inits(model)[w2]
    want = run(model, TEST)[0]
    with pytest.raises(BnSlimError, match="written once per slice"):  # two copies of w2: growth, counted (issue 16)
        prune(model, threshold=1e-3, round_to=1, importance="gamma", exact_borders=True)
    for data in (None, DATA):
        result = prune(model, threshold=1e-3, round_to=1, importance="gamma", exact_borders=True, allow_growth=True,
                       **({"data": data} if data else {}))
        assert result.report.removed_channels == 2
        inits = _inits(result.model)
        branch = next(n for n in result.model.graph.node if n.op_type == "If")
        for attr in branch.attribute:  # the branches read the weight as it was (onnx-graphsurgeon
            seen = {**inits, **{t.name: numpy_helper.to_array(t) for t in attr.g.initializer}}  # may copy it in)
            np.testing.assert_array_equal(seen[w2], full)
        conv = [n for n in result.model.graph.node if n.op_type == "Conv"][1]
        assert conv.input[1] != w2 and inits[conv.input[1]].shape == (8, 6, 3, 3)
        np.testing.assert_allclose(run(result.model, TEST)[0], want, atol=1e-5 * np.abs(want).max())


def test_refit_follows_outer_scope_reads_of_an_if_between_layers(monkeypatch):
    """The If reads the graph input inside its branch: the segment that runs it gets that input,
    the layer after the If (its input changed through the branch) is refit too."""
    without_carriers(monkeypatch)  # the refit against bias folding's border error
    model = _if_model("activation")
    want = run(model, TEST)[0]
    options = dict(threshold=1e-3, round_to=1, importance="gamma")
    folded = prune(model, compensation="bias", **options)
    result = prune(model, data=DATA, **options)
    convs = [n.name for n in model.graph.node if n.op_type == "Conv"]
    assert [f.node for f in result.reconstruction.layers] == convs[1:]
    assert result.reconstruction.levels == 2
    assert _rel(run(result.model, TEST)[0], want) < 0.7 * _rel(run(folded.model, TEST)[0], want)
    assert rec.reads(next(n for n in model.graph.node if n.op_type == "If"))[-1] == "x"


def test_refit_with_fewer_samples_than_the_fixed_batch_skips_every_layer():
    b = Builder(seed=3)
    x = b.op("Relu", [b.bn(b.conv("x", 3, 8, k=3), 8)])
    model = b.model({"x": [4, 3, H, H]}, [b.conv(x, 8, 4, k=3)])
    pruned = prune(model, ratio=0.3, round_to=1, compensation="bias").model
    out, report = rec.reconstruct(model, pruned, {"x": random_input([3, 3, H, H], seed=1)})
    assert report.layers == [] and len(report.skipped) == 1
    assert "3 calibration samples do not fill one batch of the model's fixed batch size 4" in report.skipped[0][1]
    for name, value in _inits(pruned).items():
        np.testing.assert_array_equal(_inits(out)[name], value)
    _, report = rec.reconstruct(model, pruned, {"x": random_input([9, 3, H, H], seed=1)})  # 2 batches, 1 left
    assert len(report.layers) == 1 and report.samples == 9


# ------------------------------------------------------------------------------ storage types
def _fp16_model() -> onnx.ModelProto:
    b = Builder(seed=2)
    x = b.op("Relu", [b.bn(b.conv("x", 3, 16, k=3, bias=True), 16, dead=np.arange(0, 16, 2), beta_dead=None)])
    y = b.op("Relu", [b.bn(b.conv(x, 16, 16, k=1, pad=0, bias=True), 16, dead=np.array([3]), beta_dead=0.0)])
    return fp16_behind_casts(b.model({"x": [None, 3, H, H]}, [b.conv(y, 16, 4, k=3)]))


@pytest.mark.parametrize("with_data", [False, True])
def test_fp16_weights_behind_a_cast_keep_their_storage_type(with_data):
    model = _fp16_model()
    result = prune(model, threshold=1e-3, round_to=1, importance="gamma", **({"data": DATA} if with_data else {}))
    assert result.report.removed_channels == 9
    pruned = result.model
    stored = {t.name: t.data_type for t in pruned.graph.initializer}
    # the one bias that absorbed the removed constants stays float32 (exact), under the Cast's name
    wide = [t.name for t in pruned.graph.initializer if t.name.endswith("_f32")]
    assert len(wide) == 1 and stored[wide[0]] == TensorProto.FLOAT
    for tensor in model.graph.initializer:
        if tensor.data_type == TensorProto.FLOAT16 and tensor.name + "_f32" not in wide:
            assert stored[tensor.name] == TensorProto.FLOAT16, tensor.name
    casts = [n for n in pruned.graph.node if n.op_type == "Cast"]
    assert len(casts) == 4 and all(stored.get(n.input[0]) == TensorProto.FLOAT16 for n in casts)
    assert weight_bytes(pruned) < 0.75 * weight_bytes(model)
    want = run(model, TEST)[0]
    np.testing.assert_allclose(run(pruned, TEST)[0], want, atol=1e-5 * np.abs(want).max())
    names = set(stored)
    assert all(layer["weight"] in names for layer in export_widths(result.report)["layers"])
    if with_data:  # refused by the refit with its reason, left exact as bias folding made it
        assert all("behind a Cast" in reason for _, reason in result.reconstruction.skipped)


def test_growth_check_fires_when_fp16_weights_are_written_wider():
    """The size accounting counts a widened fp16 tensor at its stored size: a pruned model made
    larger than its input by widening is refused (unless --allow-growth)."""
    original = helper.make_model(helper.make_graph([], "g", [], [], [
        numpy_helper.from_array(np.zeros(64, np.float16), "b"), numpy_helper.from_array(np.zeros(8, np.float32), "w")]))
    pruned = helper.make_model(helper.make_graph([], "g", [], [], [
        numpy_helper.from_array(np.zeros(64, np.float32), "b_f32"), numpy_helper.from_array(np.zeros(4, np.float32), "w")]))
    weights = account(original, pruned, {}, {"b_f32": 128})
    assert weights.widened == 128 and weights.after > weights.before
    with pytest.raises(BnSlimError, match="written as float32"):
        check_size(weights, False, "m.onnx")
    check_size(weights, True, "m.onnx")
    pruned.graph.initializer[0].CopyFrom(numpy_helper.from_array(np.zeros(20, np.float32), "b_f32"))
    check_size(account(original, pruned, {}, {"b_f32": 40}), False, "m.onnx")  # smaller than the input: fine


def test_border_map_of_an_fp16_layer_the_refit_leaves_is_dropped_when_it_would_grow_the_model():
    """Fuzz finding: an fp16 conv behind a Cast (left by the refit) behind live channels removed by
    data importance kept its border map, and the model grew past the input (880 -> 1,210 bytes)."""
    b = Builder(seed=45, opset=9)
    r1 = b.op("Relu", [b.bn(b.conv("x", 3, 4, k=3), 4)])
    r2 = b.op("Relu", [b.bn(b.conv(r1, 4, 5, k=3), 5)])
    cat = b.op("Concat", [r1, r2], axis=1)
    model = fp16_behind_casts(b.model({"x": [2, 3, 6, 6]}, [b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [cat])]),
                                                                   9, 4)]))
    samples = np.random.default_rng(0).standard_normal((64, 3, 6, 6)).astype(np.float32)
    result = prune(model, target_macs=0.8, importance="data", min_channels=1, data={"x": samples},
                   calibration_samples=48)
    assert result.report.removed_channels > 0
    assert any("behind a Cast" in reason for _, reason in result.reconstruction.skipped)
    assert result.reconstruction.maps_dropped == 1 and result.reconstruction.maps_too_large == 1
    assert weight_bytes(result.model) <= weight_bytes(model)
    assert not any(n.op_type == "Add" for n in result.model.graph.node)

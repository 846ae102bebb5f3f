"""The pruned model keeps the input's interface and size: inputs first, names, metadata,
initializer-inputs, IR 3, shared weights, dtypes."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from onnxslim_bn import BnSlimError, prune
from onnxslim_bn.ir.model_io import weight_bytes
from tests.graphs import Builder, random_input, run

DEAD = np.array([1, 4, 6])


def slim(model, **kwargs):
    kwargs.setdefault("threshold", 1e-6)
    kwargs.setdefault("min_channels", 1)
    kwargs.setdefault("round_to", 1)
    return prune(model, **kwargs)


def same_outputs(model, pruned, shape, atol=1e-5):
    x = random_input(shape)
    for a, b in zip(run(model, {"x": x}), run(pruned, {"x": x})):
        np.testing.assert_allclose(b, a, rtol=0, atol=atol)


def signature(values):
    return [(v.name, v.type.tensor_type.elem_type, len(v.type.tensor_type.shape.dim)) for v in values]


def stem(b: Builder, cout=8, beta_dead=None):
    """x -> Conv -> BN with DEAD channels at gamma 0 (random beta: the consumers must absorb it)."""
    return b.op("Relu", [b.bn(b.conv("x", 3, cout), cout, DEAD, beta_dead)])


def two_branch_model(b: Builder) -> onnx.ModelProto:
    """Two 1x1 convs without bias read the same pruned space: both need a new bias."""
    a = stem(b)
    y = b.op("Add", [b.conv(a, 8, 4, k=1), b.conv(a, 8, 4, k=1)])
    return b.model({"x": [1, 3, 6, 6]}, [y])


def as_dtype(model: onnx.ModelProto, elem: int, source: int = TensorProto.FLOAT) -> onnx.ModelProto:
    """The same graph with every ``source``-typed (float) tensor in ``elem`` (fp16, double, float)."""
    np_type = helper.tensor_dtype_to_np_dtype(elem)
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for i, t in enumerate(out.graph.initializer):
        if t.data_type == source:
            out.graph.initializer[i].CopyFrom(numpy_helper.from_array(numpy_helper.to_array(t).astype(np_type), t.name))
    for v in list(out.graph.input) + list(out.graph.output) + list(out.graph.value_info):
        if v.type.tensor_type.elem_type == source:
            v.type.tensor_type.elem_type = elem
    onnx.checker.check_model(out, full_check=True)
    return out


# ---------------------------------------------------------------- inputs first


def test_stale_declared_output_shape_is_dropped_with_a_note():
    b = Builder()
    model = b.model({"x": [1, 3, 6, 6]}, [b.conv(stem(b), 8, 4, k=1)])
    out = model.graph.output[0]
    out.type.tensor_type.shape.ClearField("dim")  # declared rank 0, as PP-OCRv5 exports do
    with pytest.raises((onnx.checker.ValidationError, onnx.shape_inference.InferenceError)):
        onnx.checker.check_model(model, full_check=True)
    before = model.SerializeToString()
    result = slim(model)
    name = out.name
    assert f"dropped the stale declared shape of output '{name}' (rank 0; inferred rank 4)" in " ".join(result.report.notes)
    assert model.SerializeToString() == before  # the caller's model is not modified
    onnx.checker.check_model(result.model, full_check=True)
    assert len(result.model.graph.output[0].type.tensor_type.shape.dim) == 4
    same_outputs(model, result.model, [1, 3, 6, 6])


def test_an_input_that_fails_the_checker_otherwise_is_one_line_about_the_input():
    b = Builder()
    model = b.model({"x": [1, 3, 6, 6]}, [b.conv(stem(b), 8, 4, k=1)])
    model.graph.node[0].input[1] = "no_such_weight"
    with pytest.raises(BnSlimError) as err:
        slim(model)
    message = str(err.value)
    assert "the input model fails the ONNX checker" in message and "no_such_weight" in message
    assert "bug" not in message and len(message.splitlines()) == 1


def test_an_input_onnxruntime_cannot_load_is_refused_before_any_work():
    b = Builder()  # onnxruntime has no double Conv on CPU: a valid model it cannot load
    model = as_dtype(b.model({"x": [1, 3, 6, 6]}, [b.conv(stem(b), 8, 4, k=1)]), TensorProto.DOUBLE)
    with pytest.raises(BnSlimError, match=r"\(the input model\): onnxruntime cannot load it") as err:
        slim(model)
    assert len(str(err.value).splitlines()) == 1


# ---------------------------------------------------------------- interface, IR, metadata


def ir3_model() -> onnx.ModelProto:
    b = Builder(opset=7)
    y = b.gemm(b.op("Flatten", [b.op("GlobalAveragePool", [b.conv(stem(b), 8, 6, k=1)])]), 6, 5)
    model = b.model({"x": [2, 3, 6, 6]}, [y])
    model.ir_version = 3
    for t in model.graph.initializer:  # IR < 4: every initializer is also a graph input
        model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
    onnx.checker.check_model(model, full_check=True)
    return model


def test_ir3_opset7_model_prunes_with_every_initializer_an_input():
    model = ir3_model()
    result = slim(model)
    pruned = result.model
    assert pruned.ir_version == 3 and [(o.domain, o.version) for o in pruned.opset_import] == [("", 7)]
    onnx.checker.check_model(pruned, full_check=True)
    inits = {t.name: list(t.dims) for t in pruned.graph.initializer}
    inputs = [v.name for v in pruned.graph.input]
    assert set(inits) <= set(inputs)
    n = len(model.graph.input)
    assert signature(pruned.graph.input)[:n] == signature(model.graph.input)  # same names, order, types, ranks
    assert signature(pruned.graph.output) == signature(model.graph.output)
    for v in pruned.graph.input[1:]:  # the listed shapes are the pruned ones
        assert [d.dim_value for d in v.type.tensor_type.shape.dim] == inits[v.name]
    assert result.report.removed_channels == len(DEAD)
    x = random_input([2, 3, 6, 6])
    np.testing.assert_allclose(run(pruned, {"x": x})[0], run(model, {"x": x})[0], rtol=0, atol=1e-5)


def test_overridable_weight_stays_a_graph_input_with_its_pruned_shape():
    b = Builder()
    model = b.model({"x": [1, 3, 6, 6]}, [b.conv(stem(b), 8, 4, k=1)])
    weight = model.graph.node[0].input[1]  # the stem conv's weight: pruned along its outputs
    init = next(t for t in model.graph.initializer if t.name == weight)
    model.graph.input.append(helper.make_tensor_value_info(weight, TensorProto.FLOAT, list(init.dims)))
    onnx.checker.check_model(model, full_check=True)
    pruned = slim(model).model
    assert [v.name for v in pruned.graph.input] == ["x", weight]
    dims = [d.dim_value for d in pruned.graph.input[1].type.tensor_type.shape.dim]
    assert dims == [8 - len(DEAD), 3, 3, 3]
    same_outputs(model, pruned, [1, 3, 6, 6])


def test_node_graph_and_model_metadata_are_kept():
    b = Builder()
    model = two_branch_model(b)
    for i, node in enumerate(model.graph.node):
        node.metadata_props.add(key="pkg.torch.onnx.stack_trace", value=f"line {i}")
    model.metadata_props.add(key="author", value="tests")
    model.graph.metadata_props.add(key="graph_note", value="kept")
    pruned = slim(model).model
    original = {n.name: [(p.key, p.value) for p in n.metadata_props] for n in model.graph.node}
    kept = {n.name: [(p.key, p.value) for p in n.metadata_props] for n in pruned.graph.node if n.name in original}
    assert kept == original
    assert ("author", "tests") in [(p.key, p.value) for p in pruned.metadata_props]
    assert [(p.key, p.value) for p in pruned.graph.metadata_props] == [("graph_note", "kept")]


# ---------------------------------------------------------------- node names are not identities


@pytest.mark.parametrize("naming", ["unnamed", "duplicated"])
def test_unnamed_and_duplicate_node_names_prune_exactly(naming):
    b = Builder()
    model = two_branch_model(b)
    for node in model.graph.node:
        node.name = "" if naming == "unnamed" else "layer"
    onnx.checker.check_model(model, full_check=True)
    result = slim(model, verify=False)
    pruned = result.model
    assert result.report.removed_channels == len(DEAD)
    names = [t.name for t in pruned.graph.initializer]
    assert len(names) == len(set(names))
    convs = [n for n in pruned.graph.node if n.op_type == "Conv"]
    assert sum(len(n.input) == 3 for n in convs) >= 2  # both branches got a bias
    assert len({n.input[2] for n in convs if len(n.input) == 3}) == sum(len(n.input) == 3 for n in convs)
    onnx.checker.check_model(pruned, full_check=True)
    reference = two_branch_model(Builder())  # the same graph, named (onnxruntime refuses repeated names)
    same_outputs(reference, pruned, [1, 3, 6, 6])


# ---------------------------------------------------------------- shared weights stay shared


def shared_weight_model(different: bool) -> onnx.ModelProto:
    """Two 1x1 convs read one weight W [cout, 8]: from one pruned space (same slice) or from two
    spaces with different dead channels (two slices)."""
    b = Builder()
    a = stem(b)
    if different:
        b2_dead = np.array([0, 2])
        c = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, b2_dead, None)])
    else:
        c = a
    w = b.const(b.rng.standard_normal((512, 8, 1, 1)).astype(np.float32) * 0.3, "w")
    y1 = b.op("Conv", [a, w], kernel_shape=[1, 1])
    y2 = b.op("Conv", [c, w], kernel_shape=[1, 1])
    return b.model({"x": [1, 3, 6, 6]}, [b.op("Add", [y1, y2])])


def test_a_weight_shared_by_readers_of_the_same_channels_stays_one_tensor():
    model = shared_weight_model(different=False)
    w = model.graph.node[-3].input[1]
    pruned = slim(model).model
    convs = [n for n in pruned.graph.node if n.op_type == "Conv" and n.input[0] != "x"]
    assert len(convs) == 2 and convs[0].input[1] == convs[1].input[1] == w
    assert sum(t.name.startswith(w) for t in pruned.graph.initializer) == 1
    assert weight_bytes(pruned) <= weight_bytes(model)
    same_outputs(model, pruned, [1, 3, 6, 6])


def test_shared_weight_needing_two_slices_is_refused_over_the_growth_limit_unless_allowed():
    model = shared_weight_model(different=True)
    with pytest.raises(BnSlimError, match="--allow-growth") as err:
        slim(model)
    assert "written once per slice" in str(err.value) and len(str(err.value).splitlines()) == 1
    result = slim(model, allow_growth=True)
    assert weight_bytes(result.model) > 1.1 * weight_bytes(model)
    same_outputs(model, result.model, [1, 3, 6, 6])


def test_identical_copies_of_a_shared_weight_are_caught(monkeypatch):
    from onnxslim_bn.ir import values as edits

    counter = iter(range(10**6))
    monkeypatch.setattr(edits, "_fingerprint", lambda values: next(counter))  # dedupe broken on purpose
    with pytest.raises(BnSlimError, match="identical copies"):
        slim(shared_weight_model(different=False))


# ---------------------------------------------------------------- dtypes and the checker


@pytest.mark.parametrize("elem", [TensorProto.FLOAT16, TensorProto.DOUBLE], ids=["fp16", "double"])
def test_exact_borders_follow_the_model_dtype(elem):
    b = Builder()
    model32 = b.model({"x": [1, 3, 6, 6]}, [b.conv(stem(b), 8, 4, k=3)])
    model = as_dtype(model32, elem)
    # onnxruntime runs fp16 Conv on CPU but not double: the double model is pruned without the comparison
    result = slim(model, exact_borders=True, verify=elem == TensorProto.FLOAT16)
    pruned = result.model
    onnx.checker.check_model(pruned, full_check=True)
    assert result.report.surgery.approximate_layers == 0
    adds = [n for n in pruned.graph.node if n.op_type == "Add"]
    inits = {t.name: t for t in pruned.graph.initializer}
    assert adds and all(inits[n.input[1]].data_type == elem for n in adds)
    assert all(t.data_type in (elem, TensorProto.INT64) for t in pruned.graph.initializer)
    x = random_input([1, 3, 6, 6])
    if elem == TensorProto.FLOAT16:
        a, p = run(model, {"x": x.astype(np.float16)})[0], run(pruned, {"x": x.astype(np.float16)})[0]
        assert p.dtype == np.float16
        np.testing.assert_allclose(p.astype(np.float32), a.astype(np.float32), rtol=0, atol=2e-2)
    else:  # the double pruned model, read back as float32, against the float32 original
        back = as_dtype(pruned, TensorProto.FLOAT, source=TensorProto.DOUBLE)
        np.testing.assert_allclose(run(back, {"x": x})[0], run(model32, {"x": x})[0], rtol=0, atol=1e-5)


def test_no_verify_still_runs_the_checker(monkeypatch):
    from onnxslim_bn.passes import verify

    checked = []
    real = verify.check_model
    monkeypatch.setattr(verify, "check_model", lambda model, what: (checked.append(what), real(model, what)))
    slim(two_branch_model(Builder()), verify=False)
    assert checked and checked[-1].endswith("(pruned)")

    def reject(model, what):
        raise BnSlimError(f"{what}: the ONNX checker rejects it (test)")

    monkeypatch.setattr(verify, "check_model", reject)
    with pytest.raises(BnSlimError, match="checker rejects"):
        slim(two_branch_model(Builder()), verify=False)

"""Issue 16: a model from which almost nothing was removed is not larger on disk than its input.

What grew it: an fp16 weight behind a Cast that an If branch reads came back inside the branch
as a float32 copy (the storage was restored for the top-level readers only, and the size check
counted the top-level initializers only); names the tool gives nameless nodes for its
bookkeeping were written out. The fuzz holds every random graph to the same property
(tests/test_fuzz.py ``never_larger``)."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_bn import BnSlimError, prune
from onnxslim_bn.ir.model_io import graphs, weight_bytes
from tests.fixtures import path as fixture_path
from tests.graphs import Builder, fp16_behind_casts, random_input, run
from tests.test_interface import two_branch_model

SHAPE = [1, 3, 8, 8]


def slim(model: onnx.ModelProto, **kwargs):
    return prune(model, **{"threshold": 1e-6, "min_channels": 1, "round_to": 1, **kwargs})


def same_outputs(model: onnx.ModelProto, pruned: onnx.ModelProto, shape: list[int] = SHAPE) -> None:
    x = random_input(shape)
    for want, got in zip(run(model, {"x": x}), run(pruned, {"x": x})):
        np.testing.assert_allclose(got, want, rtol=0, atol=1e-5 * float(np.abs(want).max()))


def initializers(model: onnx.ModelProto) -> list[onnx.TensorProto]:
    return [t for g in graphs(model.graph) for t in g.initializer]


def if_reading(b: Builder, weight: str) -> str:
    """An If (constant condition) whose else branch reads ``weight`` from the outer scope."""
    then = helper.make_graph([helper.make_node("ReduceMean", ["x"], ["if_then"], keepdims=0)], "then", [],
                             [helper.make_tensor_value_info("if_then", TensorProto.FLOAT, [])])
    other = helper.make_graph([helper.make_node("ReduceMean", [weight], ["if_else"], keepdims=0)], "else", [],
                              [helper.make_tensor_value_info("if_else", TensorProto.FLOAT, [])])
    b.nodes.append(helper.make_node("If", [b.const(np.array(False), "cond")], ["if_out"], then_branch=then,
                                    else_branch=other, name="If"))
    return "if_out"


def weight_of(b: Builder, output: str) -> str:
    return next(n for n in b.nodes if output in n.output).input[1]


# ---------------------------------------------------------------- fp16 storage read inside an If


def test_an_fp16_weight_an_if_branch_reads_stays_one_fp16_tensor_behind_its_cast():
    """A head conv (its channels blocked by the graph output, its weight never sliced) whose
    fp16 weight an If branch also reads: the branch reads the same outer Cast, as in the input."""
    b = Builder(seed=2)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, np.array([1, 5]))])
    head = b.conv("x", 3, 32)  # 32 x 3 x 3 x 3 weights: a float32 copy is 1.7 KB
    out = b.conv(y, 8, 4, k=1)
    model = fp16_behind_casts(b.model({"x": SHAPE}, [out, head, if_reading(b, weight_of(b, head))]))
    cast_of_head = next(n for n in model.graph.node if n.op_type == "If").attribute[1].g.node[0].input[0]
    result = slim(model)
    pruned = result.model
    assert result.report.removed_channels == 2
    assert [t.name for t in initializers(pruned) if t.data_type == TensorProto.FLOAT
            and t.name.startswith(weight_of(b, head))] == []
    branch = next(n for n in pruned.graph.node if n.op_type == "If").attribute[1].g
    assert not branch.initializer and branch.node[0].input[0] == cast_of_head  # the outer Cast's output
    assert weight_bytes(pruned) < weight_bytes(model) and pruned.ByteSize() < model.ByteSize()
    same_outputs(model, pruned)


def sliced_and_read_whole() -> onnx.ModelProto:
    """A conv whose fp16 weight is sliced (its output channels pruned) and read whole by an If branch."""
    b = Builder(seed=1)
    conv = b.conv("x", 3, 8)
    y = b.op("Relu", [b.bn(conv, 8, np.array([1, 5]))])
    return fp16_behind_casts(b.model({"x": SHAPE}, [b.conv(y, 8, 4, k=1), if_reading(b, weight_of(b, conv))]))


def test_a_sliced_fp16_weight_an_if_branch_reads_whole_is_growth_refused_unless_allowed():
    """Two tensors are unavoidable (the layer's slice, the branch's whole weight): counted with the
    branch's initializers, that is growth, refused in one line; allowed, both stay fp16."""
    model = sliced_and_read_whole()
    with pytest.raises(BnSlimError, match="would exceed the input's") as err:
        slim(model)
    assert len(str(err.value).splitlines()) == 1 and "nothing was written" in str(err.value)
    pruned = slim(model, allow_growth=True).model
    assert not any(t.data_type == TensorProto.FLOAT and t.name.startswith("w1") for t in initializers(pruned))
    assert not any(g.initializer for g in list(graphs(pruned.graph))[1:])  # the branch reads the outer Cast
    same_outputs(model, pruned)


# ---------------------------------------------------------------- names the input did not have


def unnamed(model: onnx.ModelProto, every: int = 1) -> onnx.ModelProto:
    for i, node in enumerate(model.graph.node):
        if i % every == 0:
            node.name = ""
    return model


@pytest.mark.parametrize("options", [{"threshold": 1e-6}, {"ratio": 0.05}], ids=["dead", "almost-nothing"])
def test_names_given_to_nameless_nodes_are_not_written(options):
    model = unnamed(two_branch_model(Builder()))
    result = prune(model, min_channels=1, round_to=1, **options)
    pruned = result.model
    assert [n.name for n in pruned.graph.node] == [""] * len(pruned.graph.node)
    assert pruned.ByteSize() <= model.ByteSize()
    assert result.report.before.size_bytes == model.ByteSize()
    assert result.report.after.size_bytes == pruned.ByteSize()
    same_outputs(model, pruned, [1, 3, 6, 6])


def test_only_the_nameless_nodes_stay_nameless():
    model = unnamed(two_branch_model(Builder()), every=2)
    names = [n.name for n in model.graph.node]
    pruned = slim(model).model
    assert [n.name for n in pruned.graph.node] == names  # no node added or removed here
    assert pruned.ByteSize() <= model.ByteSize()


def test_a_weight_both_if_branches_read_stays_one_tensor_in_the_main_graph():
    """onnx-graphsurgeon writes an outer constant into every body that reads it: the weight
    the input held once in its main graph is written back there, once."""
    b = Builder(seed=2)
    y = b.op("Relu", [b.bn(b.conv("x", 3, 8), 8, np.array([1, 5]))])
    head = b.conv("x", 3, 32)
    w = weight_of(b, head)
    branches = [helper.make_graph([helper.make_node("ReduceMean", [w], [f"if_{k}"], keepdims=0)], k, [],
                                  [helper.make_tensor_value_info(f"if_{k}", TensorProto.FLOAT, [])])
                for k in ("a", "b")]
    b.nodes.append(helper.make_node("If", [b.const(np.array(True), "cond")], ["if_out"], then_branch=branches[0],
                                    else_branch=branches[1], name="If"))
    model = b.model({"x": SHAPE}, [b.conv(y, 8, 4, k=1), head, "if_out"])
    pruned = slim(model).model
    assert [t.name for t in initializers(pruned)].count(w) == 1
    assert w in [t.name for t in pruned.graph.initializer]
    assert weight_bytes(pruned) < weight_bytes(model) and pruned.ByteSize() < model.ByteSize()
    same_outputs(model, pruned)


@pytest.mark.parametrize("form", ["", "ts-folded"], ids=["bn-kept", "bn-folded"])
def test_a_nameless_fixture_pruned_at_a_tiny_ratio_is_smaller_and_stays_nameless(form):
    """A trained fixture with every node name cleared (the folded one ranks by recovered scales,
    from a calibration run: the path of prepare() that names tensors on its own)."""
    model = onnx.load(str(fixture_path("resnet", form)))
    for node in model.graph.node:
        node.name = ""
    result = prune(model, ratio=0.01, round_to=1, min_channels=1, check_samples=8)
    assert result.report.removed_channels > 0
    assert not any(n.name for g in graphs(result.model.graph) for n in g.node)
    assert result.model.ByteSize() < model.ByteSize() == result.report.before.size_bytes

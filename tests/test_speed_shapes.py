"""Widths the runtimes run fast: grouped convs keep every group on the kernels' channel block.

Structure of the pruned model and of onnxruntime's optimized graph, outputs from onnxruntime;
never a time."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest

from onnxslim_bn import prune
from onnxslim_bn.app import bench
from onnxslim_bn.hardware import channel_block, group_width
from tests.graphs import Builder, random_input, run


@pytest.mark.parametrize("per, keep, block, least, want", [
    (16, 12, 16, 1, 16),   # no multiple of 16 below 12: the group stays whole
    (16, 8, 16, 1, 16),
    (64, 40, 16, 1, 48),   # nearer multiple: 48 (8 away) over 32 (8 away): ties up
    (64, 36, 16, 1, 32),
    (64, 20, 16, 1, 16),
    (64, 10, 16, 1, 16),   # at least one block
    (64, 48, 16, 1, 48),   # on the block already
    (64, 60, 16, 1, 64),   # whole
    (64, 20, 16, 24, 32),  # at least min_channels per group, rounded up to the block
    (16, 12, 1, 1, 12),    # no block: as chosen
])
def test_group_width(per, keep, block, least, want):
    assert group_width(per, keep, block, least) == want


def grouped_model(groups: int, per: int, dead_per_group: int, c_in: int = 16) -> onnx.ModelProto:
    """1x1 conv -> BN -> Relu -> grouped 3x3 conv -> BN -> Relu -> 1x1 conv (the graph output):
    both grouped spaces have ``dead_per_group`` channels with gamma 0 and beta 0 in each group."""
    b = Builder(seed=3)
    width = groups * per
    dead = np.concatenate([g * per + np.arange(dead_per_group) * 2 for g in range(groups)])
    x = b.op("Relu", [b.bn(b.conv("x", c_in, width, k=1), width, dead=dead)])
    x = b.op("Relu", [b.bn(b.conv(x, width, width, k=3, group=groups), width, dead=dead + 1)])
    y = b.conv(x, width, c_in, k=1)
    return b.model({"x": [1, c_in, 8, 8]}, [y])


def grouped_conv(model: onnx.ModelProto) -> tuple[list[int], int]:
    """Weight shape and group of the model's grouped conv."""
    shapes = {t.name: list(t.dims) for t in model.graph.initializer}
    node = next(n for n in model.graph.node if n.op_type == "Conv"
                and next((a.i for a in n.attribute if a.name == "group"), 1) > 1)
    return shapes[node.input[1]], next(a.i for a in node.attribute if a.name == "group")


def ort_grouped_ops(model: onnx.ModelProto, tmp_path) -> list[tuple[str, str]]:
    """(domain, op) of every grouped conv in onnxruntime's optimized graph of ``model``."""
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    optimized = onnx.load(str(tmp_path / "optimized.onnx"))
    return [(n.domain, n.op_type) for n in optimized.graph.node
            if "Conv" in n.op_type and next((a.i for a in n.attribute if a.name == "group"), 1) > 1]


def test_grouped_conv_kept_whole_when_its_groups_would_fall_off_the_block(tmp_path):
    # 4 groups of 16, a quarter of each group dead in both grouped spaces: without rounding the
    # selection takes 12 per group, which onnxruntime runs outside its blocked (NCHWc) kernels
    model = grouped_model(groups=4, per=16, dead_per_group=4)
    exact = prune(model, ratio=0.25, round_to=1, verify=False)
    assert grouped_conv(exact.model) == ([48, 12, 3, 3], 4)
    block = channel_block()[0]
    if block >= 8:  # x86 with AVX2 / AVX-512: the premise, on this onnxruntime build
        assert ort_grouped_ops(model, tmp_path) == [("com.microsoft.nchwc", "Conv")]
        assert all(domain != "com.microsoft.nchwc" for domain, _ in ort_grouped_ops(exact.model, tmp_path))

    result = prune(model, ratio=0.25, round_to=16, verify=False)
    assert grouped_conv(result.model) == ([64, 16, 3, 3], 4)
    assert result.report.removed_channels == 0
    note = next(n for n in result.report.notes if n.startswith("grouped channels kept whole"))
    assert "(4x16)" in note and "blocked kernels" in note
    x = random_input([1, 16, 8, 8])
    np.testing.assert_allclose(run(result.model, {"x": x})[0], run(model, {"x": x})[0], rtol=0, atol=0)


def test_grouped_conv_on_the_block_loses_whole_blocks_per_group(tmp_path):
    # 2 groups of 32, 16 dead per group in both grouped spaces: 16 per group stays on the block,
    # the grouped conv stays on onnxruntime's blocked kernels, and the outputs do not move
    model = grouped_model(groups=2, per=32, dead_per_group=16)
    result = prune(model, ratio=0.5, round_to=16, verify=False)
    assert grouped_conv(result.model) == ([32, 16, 3, 3], 2)
    assert result.report.removed_channels == 64
    assert not any(n.startswith("grouped channels kept whole") for n in result.report.notes)
    if channel_block()[0] >= 8:
        assert ort_grouped_ops(result.model, tmp_path) == [("com.microsoft.nchwc", "Conv")]
    x = random_input([1, 16, 8, 8])
    want, got = run(model, {"x": x})[0], run(result.model, {"x": x})[0]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5 * float(np.abs(want).max()))


def test_grouped_conv_ratio_run_rounds_up_never_taking_live_channels(tmp_path):
    # 12 dead per group of 32: 20 kept per group. A --ratio run rounds up only (issue 16): the next
    # multiple of 16 is the whole group, so the grouped space stays whole, said in a note; rounding
    # down to 16 would have removed 4 live channels per group
    model = grouped_model(groups=2, per=32, dead_per_group=12)
    result = prune(model, ratio=48 / 128, round_to=16, verify=False)
    assert grouped_conv(result.model) == ([64, 32, 3, 3], 2)
    assert any(n.startswith("grouped channels kept whole") for n in result.report.notes)
    assert result.report.selection["live_removed"] == 0
    exact = prune(model, ratio=48 / 128, round_to=1, verify=False)
    assert grouped_conv(exact.model) == ([40, 20, 3, 3], 2)


# --- timing enough runs: fast models are timed for a minimum time, not a fixed count ---------


class _Clock:
    """A fake perf_counter that only the runners advance (1 ms a run): run counts are exact."""

    def __init__(self):
        self.now = 0.0

    def __call__(self) -> float:
        return self.now

    def runner(self, ms: float):
        def run(feeds):
            self.now += ms / 1e3
        return run


@pytest.mark.parametrize("min_seconds, want", [(0.0, 3), (0.05, 25), (100.0, bench.MAX_RUNS)])
def test_alternate_times_fast_models_for_a_minimum_time(min_seconds, want, monkeypatch):
    clock = _Clock()
    monkeypatch.setattr(bench.time, "perf_counter", clock)
    times = bench._alternate([clock.runner(1.0), clock.runner(1.0)], {}, warmup=2, runs=3, min_seconds=min_seconds)
    assert [len(t) for t in times] == [want, want]  # 2 ms per pass of both: 0.05 s is 25 passes
    assert all(t == pytest.approx(1e-3) for t in times[0] + times[1])


def test_benchmark_says_when_rows_ran_longer(monkeypatch, tmp_path):
    model = grouped_model(groups=2, per=32, dead_per_group=16)
    pruned = prune(model, ratio=0.5, round_to=16, verify=False).model
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    onnx.save(model, str(paths[0]))
    onnx.save(pruned, str(paths[1]))
    seen = []

    def fake(runners, feeds, warmup, runs, min_seconds=0.0):  # the original takes 2 ms, the pruned model 1 ms
        seen.append(min_seconds)
        n = runs * 10 if min_seconds else runs
        return [[2e-3 if run == "a.onnx" else 1e-3] * n for run in runners]

    monkeypatch.setitem(bench._RUNNERS, "onnxruntime", lambda path, threads: Path(path).name)
    monkeypatch.setattr(bench, "_alternate", fake)
    result = bench.benchmark(*paths, batches=(1,), runs=4, warmup=1, runtimes=("onnxruntime",), rounds=2,
                             min_seconds=0.5)
    assert seen == [0.5, 0.5]
    assert any("timed for at least 0.5 s: the rows ran 40 to 40 runs" in n for n in result.notes)
    assert result.rows[0].speedup == pytest.approx(2.0)


def test_models_take_turns_in_the_first_slot(monkeypatch, tmp_path):
    # the first slot ran a copy of the same model faster in OpenVINO: each model holds it every other round
    paths = [tmp_path / "a.onnx", tmp_path / "b.onnx"]
    for p in paths:
        onnx.save(grouped_model(groups=2, per=32, dead_per_group=16), str(p))
    slots = []

    def fake(runners, feeds, warmup, runs, min_seconds=0.0):  # slot 0 is 10% faster, whoever is in it
        slots.append(list(runners))
        return [[(0.9 if k == 0 else 1.0) * 1e-3] * runs for k in range(len(runners))]

    monkeypatch.setitem(bench._RUNNERS, "onnxruntime", lambda path, threads: Path(path).name)
    monkeypatch.setattr(bench, "_alternate", fake)
    result = bench.benchmark(*paths, batches=(1,), runs=8, warmup=0, runtimes=("onnxruntime",))
    # 4 rounds by default, the original's copy (the A/A band) the third runner
    assert [[s.removesuffix(".onnx") for s in round_] for round_ in slots] == [
        ["a", "b", "a"], ["b", "a", "a"], ["a", "a", "b"], ["a", "b", "a"]]
    # original and pruned held the first slot once each (the copy twice): the speed-up is even
    assert result.rows[0].round_speedups == pytest.approx([0.9, 1 / 0.9, 1.0, 1.0])
    assert result.rows[0].speedup == pytest.approx(1.0)
    # the copy held the first slot twice in 4 rounds, the original once: the band is the wider for it
    assert result.rows[0].band.aa == pytest.approx(0.95) and result.rows[0].verdict == "same"

"""bench, probe, --round-to auto and the latency table: structure and behaviour, never a time."""

from __future__ import annotations

import io
import json
import sys

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from onnxslim_bn.app import bench
from onnxslim_bn.app.bench import Blame, ProbeResult, benchmark, check_same_interface, probe
from onnxslim_bn.app.cli import main
from onnxslim_bn.errors import BnSlimError
from onnxslim_bn.hardware import channel_block, resolve_round_to, round_width, round_widths, width_candidates
from onnxslim_bn.ir.shapes import infer_shapes
from onnxslim_bn.passes import latency
from onnxslim_bn.passes.latency import LatencyCurve, TableStats, layer_latency_table, predicted_ms
from tests.graphs import Builder, random_input


def tiny(cout: int = 16, seed: int = 0) -> onnx.ModelProto:
    """Conv 3->cout, BN, ReLU, Conv cout->16, global pool, Gemm 16->10 on [N, 3, 8, 8]."""
    b = Builder(seed)
    y = b.op("Relu", [b.bn(b.conv("x", 3, cout), cout)])
    y = b.op("Relu", [b.conv(y, cout, 16, k=1)])
    y = b.op("Flatten", [b.op("GlobalAveragePool", [y])])
    return b.model({"x": ["N", 3, 8, 8]}, [b.gemm(y, 16, 10)])


@pytest.fixture()
def pair(tmp_path):
    a, p = tmp_path / "a.onnx", tmp_path / "p.onnx"
    onnx.save(tiny(16), str(a))
    onnx.save(tiny(8), str(p))
    return a, p


# --- bench -------------------------------------------------------------------------------------


def test_alternation_is_abba():
    calls = []
    runners = [lambda f: calls.append("A"), lambda f: calls.append("B")]
    times = bench._alternate(runners, {}, warmup=1, runs=4)
    assert "".join(calls) == "AB" + "AB" + "BA" + "AB" + "BA"
    assert [len(t) for t in times] == [4, 4]


def test_rows_rounds_and_progress_lines(pair):
    out = io.StringIO()  # not a terminal: one line per round and runtime
    result = benchmark(*pair, batches=(1, 2), runs=4, warmup=1, runtimes=("onnxruntime",), rounds=2,
                       progress=True, stream=out)
    lines = out.getvalue().splitlines()
    assert len(lines) == 2 and lines[0].startswith("bench: 1/2 round 1/2 onnxruntime batch 1, 2")
    assert "\r" not in out.getvalue()
    assert (result.runs, result.rounds) == (4, 2)
    assert [(r.runtime, r.batch, len(r.round_speedups)) for r in result.rows] == [("onnxruntime", 1, 2), ("onnxruntime", 2, 2)]
    for row in result.rows:
        for t in (row.original, row.pruned):
            assert 0 < t.p10_ms <= t.median_ms <= t.p90_ms
        assert row.ideal == pytest.approx(_macs(tiny(16)) / _macs(tiny(8)), rel=1e-9)
    assert "Rounds" in result.table() and "| Rounds |" in result.table(markdown=True)
    quiet = io.StringIO()
    benchmark(*pair, batches=(1,), runs=1, warmup=0, runtimes=("onnxruntime",), rounds=1, progress=False, stream=quiet)
    assert quiet.getvalue() == ""


def _macs(model: onnx.ModelProto) -> int:
    # Conv 3x3 3->c on 8x8, Conv 1x1 c->16, Gemm 16->10
    c = model.graph.initializer[0].dims[0]
    return 64 * c * 3 * 9 + 64 * 16 * c + 16 * 10


def test_wide_spread_is_one_note(pair, monkeypatch):
    steady, noisy = [1e-3] * 10, [1e-3] * 5 + [2e-3] * 5  # p90/p10: 1.0 and 2.0

    def fake(runners, feeds, warmup, runs, min_seconds=0.0):  # the original is noisy at batch 2
        return [noisy if run == "original" and feeds["x"].shape[0] == 2 else steady for run in runners]

    names = {str(pair[0]): "original", str(pair[1]): "pruned"}
    monkeypatch.setitem(bench._RUNNERS, "onnxruntime", lambda path, threads: names[str(path)])
    monkeypatch.setattr(bench, "_alternate", fake)
    result = benchmark(*pair, batches=(1, 2), runs=10, warmup=0, runtimes=("onnxruntime",), rounds=2)
    assert [r.original.spread for r in result.rows] == [1.0, 2.0]
    assert [r.round_speedups for r in result.rows] == [[1.0, 1.0], [1.5, 1.5]]
    wide = [n for n in result.notes if "wide spread" in n]
    assert len(wide) == 1 and "onnxruntime batch 2 (2.00 / 1.00)" in wide[0] and "batch 1" not in wide[0]


def test_falls_back_to_onnxruntime_without_openvino(pair, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    result = benchmark(*pair, batches=(1,), runs=2, warmup=0, rounds=1)
    assert [r.runtime for r in result.rows] == ["onnxruntime"]
    assert sum("OpenVINO is not installed" in n for n in result.notes) == 1
    with pytest.raises(BnSlimError, match="OpenVINO is not installed"):
        benchmark(*pair, batches=(1,), runs=2, warmup=0, runtimes=("openvino",))


def _variant(input_name="x", out_rank=2, in_dtype=TensorProto.FLOAT, out_name=None) -> onnx.ModelProto:
    model = tiny(16)
    model.graph.input[0].name = input_name
    model.graph.node[0].input[0] = input_name
    model.graph.input[0].type.tensor_type.elem_type = in_dtype
    out = model.graph.output[0]
    if out_rank != 2:
        out.type.tensor_type.shape.dim.add().dim_value = 1
    if out_name:
        model.graph.node[-1].output[0] = out_name
        out.name = out_name
    return model


@pytest.mark.parametrize("other, words", [
    (dict(input_name="image"), "inputs ['x'] vs ['image']"),
    (dict(in_dtype=TensorProto.FLOAT16), "input 'x' is rank 4 FLOAT vs rank 4 FLOAT16"),
    (dict(out_rank=3), "is rank 2 FLOAT vs rank 3 FLOAT"),
    (dict(out_name="logits"), "outputs"),
])
def test_refuses_models_that_differ(other, words, tmp_path, capsys):
    a, b = tmp_path / "a.onnx", tmp_path / "b.onnx"
    onnx.save(tiny(16), str(a))
    onnx.save(_variant(**other), str(b))
    with pytest.raises(BnSlimError, match="differ in their") as err:
        check_same_interface(onnx.load(str(a)), onnx.load(str(b)), (str(a), str(b)))
    assert words in str(err.value) and "\n" not in str(err.value)
    assert main(["bench", str(a), str(b), "--runs", "1", "--runtimes", "onnxruntime"]) == 1
    err_text = capsys.readouterr().err.strip()
    assert len(err_text.splitlines()) == 1 and "differ in their" in err_text


# --- probe -------------------------------------------------------------------------------------


def test_probe_returns_its_measurements():
    x = {"x": random_input([2, 3, 8, 8])}
    result = probe(tiny(16), tiny(8), x, runs=3, min_seconds=0)
    assert isinstance(result, ProbeResult) and result.runs == 9  # 3 rounds of 3
    assert result.original_ms > 0 and result.pruned_ms > 0
    assert result.speedup == pytest.approx(result.original_ms / result.pruned_ms)
    assert result.faster == (result.ratio < result.band.low)
    assert result.slower == (result.ratio > result.band.high)
    assert (result.message() is None) == (not result.slower)
    assert json.loads(json.dumps(result.to_dict()))["runs"] == 9


def test_node_times_name_every_layer():
    model = tiny(16)
    times = bench._node_times(model.SerializeToString(), {"x": random_input([2, 3, 8, 8])}, 1, 2)
    layers = {bench._layer_of(model, name) for name in times}
    convs_and_gemm = {n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")}
    assert convs_and_gemm <= layers
    assert all(ms >= 0 for _, ms in times.values())


def test_blame_sums_fused_nodes_into_their_layer():
    model = tiny(16)
    conv = model.graph.node[0]
    relu_out = model.graph.node[2].output[0]  # Conv -> BN -> Relu, fused by onnxruntime into one node
    before = {f"{relu_out}_nchwc": ("Conv", 1.0), "ReorderInput": ("ReorderInput", 0.1)}
    after = {conv.name: ("Conv", 3.0), "ReorderInput": ("ReorderInput", 0.1), "ReorderOutput_token_7": ("ReorderOutput", 0.5),
             model.graph.node[2].name: ("Relu", 0.2)}
    blame = bench._blame(model, before, after)
    assert [(b.node, b.original_ms, b.pruned_ms) for b in blame] == [
        (conv.name, 1.0, 3.0), ("ReorderOutput (layout changes)", 0.0, 0.5), (model.graph.node[2].name, 0.0, 0.2)]
    slow = ProbeResult(1.0, 2.0, 5, blame)
    assert not slow.faster and conv.name in slow.message() and "0.50x" in slow.message()


# --- --round-to auto ---------------------------------------------------------------------------

AVX512 = "processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse2 avx avx2 avx512f avx512bw\n"
AVX2 = "processor\t: 0\nflags\t\t: fpu sse2 avx avx2 fma\n"
AVX = "flags\t\t: fpu sse2 avx\n"
ARM = "processor\t: 0\nFeatures\t: fp asimd evtstrm aes crc32\nCPU implementer\t: 0x41\n"


@pytest.mark.parametrize("text, machine, block, word", [
    (AVX512, "x86_64", 16, "AVX-512F"), (AVX2, "x86_64", 8, "AVX2"), (AVX, "x86_64", 8, "AVX"),
    (ARM, "aarch64", 4, "NEON"), ("flags\t: fpu sse2\n", "x86_64", 4, "no AVX"),
])
def test_channel_block_reads_cpuinfo(text, machine, block, word):
    got, why = channel_block(text, machine)
    assert got == block and word in why


def test_resolve_round_to(monkeypatch):
    from onnxslim_bn import hardware

    monkeypatch.setattr(hardware, "channel_block", lambda: (16, "AVX-512F in /proc/cpuinfo"))
    assert resolve_round_to("auto") == (16, "--round-to auto: 16 (AVX-512F in /proc/cpuinfo)")
    assert resolve_round_to(8) == (8, "--round-to 8") and resolve_round_to("4") == (4, "--round-to 4")
    for bad in (0, "x", "2.5", -8):
        with pytest.raises(BnSlimError, match="--round-to"):
            resolve_round_to(bad)


def test_channel_block_without_cpuinfo_asks_numpy(monkeypatch):
    from onnxslim_bn import hardware

    monkeypatch.setattr(hardware, "_numpy_flags", lambda: {"avx", "avx2"})
    assert channel_block("", "x86_64") == (8, "AVX2 in numpy's CPU feature detection: the CPU kernels hold 8 channels per block")


@pytest.mark.parametrize("size, keep, block, min_channels, expected", [
    (64, 40, 16, 4, (32, 48)),  # both neighbours
    (64, 48, 16, 4, ()),  # on the block already
    (64, 64, 16, 4, ()),  # not pruned: stays whole
    (24, 11, 16, 4, (16,)),  # narrow: up only (down would be 0)
    (16, 12, 16, 4, ()),  # up would undo the pruning, down would be 0
    (32, 30, 16, 4, (16,)),  # never back to the full 32
    (40, 20, 16, 17, (32,)),  # down would break min_channels
    (40, 20, 1, 4, ()),  # block 1: nothing to do
])
def test_width_candidates(size, keep, block, min_channels, expected):
    assert width_candidates(size, keep, block, min_channels) == expected


def test_round_widths_tracks_the_budget():
    # alone, each rounds to its nearest multiple (ties up)
    assert [round_width(64, k, 16) for k in (36, 40, 44, 11, 30)] == [32, 48, 48, 16, 32]
    assert round_width(32, 30, 16) == 30  # never 32 (the full width) nor 16 (too far, nothing to win back)
    # together: 40 rounds up (tie), then the next 40 rounds down to even out the total
    assert round_widths([40, 40, 40, 40], [64] * 4, 16) == [48, 32, 48, 32]
    assert sum(round_widths([40, 40, 40, 40], [64] * 4, 16)) == 160
    # the heavy space is rounded first; a light one absorbs the drift, even far from its nearest
    got = round_widths([37, 40], [64, 64], 16, weights=[1.0, 10.0])
    assert got[1] == 48  # the heavy space: a tie, up
    assert got[0] == 32  # then the light one goes down: drift 80 - 5 is closer to 0 than 80 + 11
    # a space off the block whose only candidate is far: taken only when it closes the drift
    assert round_widths([44, 30], [64, 32], 16) == [48, 30]
    assert round_widths([36, 30], [64, 32], 16) == [32, 30]
    assert round_widths([36, 20], [64, 64], 16, weights=[10, 1]) == [32, 32]  # 20 -> 32: far, but drift -40 -> -28
    with pytest.raises(ValueError):
        round_widths([1, 2], [3], 16)


# --- latency table -----------------------------------------------------------------------------


def test_curve_interpolates_and_penalises_off_block_widths():
    curve = LatencyCurve([16, 32], [16, 32], [[1.0, 2.0], [3.0, 4.0]], block=16, off_block_in=1.5, off_block_out=2.0)
    assert curve.cost(16, 16) == 1.0 and curve.cost(32, 32) == 4.0 and curve.full_ms == 4.0
    assert curve.cost(32, 24) == pytest.approx(3.5 * 2.0)  # halfway, off the block
    assert curve.cost(24, 32) == pytest.approx(3.0 * 1.5)
    assert curve.cost(8, 8) == pytest.approx(1.0 * 1.5 * 2.0)  # flat below the smallest width measured
    tied = LatencyCurve([0], [16, 48], [[1.0, 3.0]], block=16)
    assert tied.tied and tied.cost(0, 32) == pytest.approx(2.0)
    assert LatencyCurve.from_dict(json.loads(json.dumps(curve.to_dict()))) == curve


def test_monotone_grid_and_widths():
    assert latency._monotone([[1.0, 5.0], [2.0, 3.0]]) == [[1.0, 3.0], [2.0, 3.0]]
    assert latency._dominated([[1.0, 5.0], [2.0, 3.0]]) == [(0, 1)]
    assert latency._widths(64, 16) == [16, 32, 48, 64]
    assert latency._widths(1000, 16) == [256, 496, 752, 992, 1000]  # the full width off the block, and below it
    assert latency._widths(3, 16) == [3]


def test_layer_shapes_of_a_model():
    model = tiny(16)
    shapes = infer_shapes(model, {"x": [1, 3, 8, 8]}, "tiny")
    found = latency.layer_shapes(model, shapes, batch=4)
    names = [n.name for n in model.graph.node if n.op_type in ("Conv", "Gemm")]
    assert list(found) == names
    first = found[names[0]]
    assert (first.op, first.x_shape, first.c_in, first.c_out, first.kernel, first.group) == ("Conv", [4, 3, 8, 8], 3, 16, [3, 3], 1)
    assert (found[names[2]].c_in, found[names[2]].c_out) == (16, 10)
    with pytest.raises(BnSlimError, match="not 3 -> 8"):
        latency.layer_shapes(model, shapes, 1, [(names[0], 3, 8)])
    with pytest.raises(BnSlimError, match="'nope'"):
        latency.layer_shapes(model, shapes, 1, ["nope"])


def test_one_node_model_runs_at_each_width():
    model = tiny(16)
    shape = latency.layer_shapes(model, infer_shapes(model, {"x": [1, 3, 8, 8]}, "tiny"), 2)[model.graph.node[0].name]
    small = latency._layer_model(shape, 3, 8)
    onnx.checker.check_model(small, full_check=True)
    from tests.graphs import run
    assert run(small, {"x0": random_input([2, 3, 8, 8])})[0].shape == (2, 8, 8, 8)
    side_by_side = latency._widths_model(shape, [(3, 8), (3, 16)])
    onnx.checker.check_model(side_by_side, full_check=True)
    got = run(side_by_side, {"x0": random_input([2, 3, 8, 8]), "x1": random_input([2, 3, 8, 8])})
    assert [g.shape for g in got] == [(2, 8, 8, 8), (2, 16, 8, 8)]
    times = latency._time_points(shape, [(3, 8), (3, 16)], "onnxruntime", threads=1, runs=2)
    assert sorted(times) == [(3, 8), (3, 16)] and all(t > 0 for t in times.values())


def test_table_cache_round_trip(tmp_path, monkeypatch):
    model = tiny(32)
    shapes = infer_shapes(model, {"x": [1, 3, 8, 8]}, "tiny")
    cache = tmp_path / "latency.json"
    first_stats, second_stats = TableStats(), TableStats()
    first = layer_latency_table(model, shapes, runtime="onnxruntime", batch=1, threads=1, cache=cache, block=16,
                                stats=first_stats)
    assert first_stats.layers == 3 and first_stats.timed == first_stats.shapes == 3
    conv = first[model.graph.node[0].name]
    assert conv.c_in == [3] and conv.c_out == [16, 32] and all(m > 0 for m in conv.ms[0])
    assert json.loads(cache.read_text())["version"] == latency.CACHE_VERSION

    def no_timing(*args, **kwargs):
        raise AssertionError("timed although cached")

    monkeypatch.setattr(latency, "measure_curve", no_timing)
    second = layer_latency_table(model, shapes, runtime="onnxruntime", batch=1, threads=1, cache=cache, block=16,
                                 stats=second_stats)
    assert second == first and second_stats.timed == 0
    assert predicted_ms(second) == pytest.approx(sum(c.full_ms for c in first.values()))
    # another batch size is another entry: timed, not read
    with pytest.raises(AssertionError, match="timed although cached"):
        layer_latency_table(model, shapes, batch=2, threads=1, cache=cache, block=16)


def test_table_cache_default_place(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert latency.cache_path() == tmp_path / "onnx-bnslim" / "latency.json"


@pytest.mark.parametrize("load, busy", [(0.0, False), (99.0, True)])
def test_busy_machine_is_said(load, busy, pair, monkeypatch):
    monkeypatch.setattr(bench, "_load_average", lambda: load)
    monkeypatch.setattr(bench, "_alternate", lambda runners, feeds, warmup, runs, min_seconds=0.0: [[1e-3] * runs] * len(runners))
    result = benchmark(*pair, batches=(1,), runs=2, warmup=0, runtimes=("onnxruntime",), rounds=1)
    assert any("the machine was busy: load average 99.0 -> 99.0" in n for n in result.notes) == busy

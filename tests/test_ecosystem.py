"""At home in the ecosystem: subcommands and global flags, --keep by weight name, one JSON
spelling, metadata, the changed-rows table, optional OpenVINO and matplotlib, widths back to
training, sweep, and the score histogram."""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

import onnxslim_bn
from onnxslim_bn.app import cli
from onnxslim_bn.app.cli import main
from onnxslim_bn.app.histogram import dead_cluster
from onnxslim_bn.channels.reasons import At, Reason
from tests.fixtures import FIXTURES, heldout, path

ROOT = FIXTURES.parent
HELDOUT = str(path("heldout").with_suffix(".npz"))


@pytest.fixture
def vgg(tmp_path):
    target = tmp_path / "vgg.onnx"
    shutil.copy(path("vgg"), target)
    return target


@pytest.fixture
def dynamo(tmp_path):
    """The ResNet as the default dynamo exporter writes it: nodes named node_Conv_NNN, weights layers.N.*."""
    target = tmp_path / "resnet.onnx"
    shutil.copy(path("resnet", "dynamo-folded"), target)
    return target


def outputs(tmp_path) -> list[str]:
    return sorted(p.name for p in tmp_path.iterdir())


# ------------------------------------------------------------------ subcommands and global flags
def test_global_verbose_before_the_subcommand(vgg, capsys):
    assert main(["-v", "inspect", str(vgg)]) == 0
    assert "Coverage:" in capsys.readouterr().out


@pytest.mark.parametrize("argv", [["-v", "{m}", "--ratio", "0.3"], ["{m}", "-v", "--ratio", "0.3"],
                                  ["prune", "{m}", "--ratio", "0.3", "--verbose"], ["--verbose", "prune", "{m}", "--ratio", "0.3"]])
def test_verbose_anywhere_shows_the_layer_table(argv, vgg, tmp_path, capsys):
    assert main([a.format(m=vgg) for a in argv] + ["-o", str(tmp_path / "o.onnx")]) == 0
    assert "| Layer " in capsys.readouterr().out
    assert main([str(vgg), "--ratio", "0.3", "-o", str(tmp_path / "o.onnx")]) == 0
    assert "| Layer " not in capsys.readouterr().out


def test_prune_is_a_real_subcommand_and_the_default(vgg, tmp_path, capsys):
    assert main(["prune", str(vgg), "--ratio", "0.5", "-o", str(tmp_path / "a.onnx")]) == 0
    assert main([str(vgg), "--ratio", "0.5", "-o", str(tmp_path / "b.onnx")]) == 0
    assert main(["-q", str(vgg), "--ratio", "0.5", "-o", str(tmp_path / "c.onnx")]) == 0
    a, b, c = (onnx.load(str(tmp_path / f"{n}.onnx")) for n in "abc")
    assert a.graph == b.graph == c.graph


def test_keep_before_the_model_does_not_swallow_it(dynamo, tmp_path):
    report = tmp_path / "r.json"
    assert main(["--keep", "layers.4.*", str(dynamo), "--ratio", "0.5", "-o", str(tmp_path / "o.onnx"),
                 "--json", str(report)]) == 0
    data = json.loads(report.read_text())
    assert data["options"]["given"]["keep"] == ["layers.4.*"]
    protected = [s for s in data["spaces"] if s["blocked_code"] == "protected"]
    assert {s["label"] for s in protected} == {"layers.4.conv1.weight", "layers.4.short.0.weight"}
    assert all(s["removed"] == [] for s in protected)
    assert sorted(data["options"]["resolved"]["protected_layers"]) == sorted(
        layer["node"] for s in protected for layer in s["layers"])


def test_keep_matches_weight_names_and_node_names_alike(tmp_path):
    bn_kept = str(path("resnet"))  # TorchScript export: nodes are /layers/layers.4/conv1/Conv
    by_weight = onnxslim_bn.prune(bn_kept, ratio=0.5, keep=["layers.4.conv1.weight"], verify=False).report
    by_node = onnxslim_bn.prune(bn_kept, ratio=0.5, keep=["/layers/layers.4/conv1/*"], verify=False).report
    for report in (by_weight, by_node):
        hit = [s for s in report.spaces if s.blocked_code == "protected"]
        assert [s.label for s in hit] == ["layers.4.conv1.weight"] and hit[0].kept == hit[0].channels


def test_keep_matching_nothing_is_an_error_naming_the_closest(dynamo, tmp_path, capsys):
    assert main([str(dynamo), "--keep", "layer4.conv1*", "--ratio", "0.5"]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1
    assert "--keep 'layer4.conv1*' matches no layer" in err and "layers.4.conv1.weight" in err
    assert outputs(tmp_path) == ["resnet.onnx"]


def test_protect_is_an_alias_of_keep(vgg):
    report = onnxslim_bn.prune(str(vgg), ratio=0.3, verify=False).report
    assert cli._parser().parse_args(["prune", str(vgg), "--ratio", "0.3", "--protect", "a", "--keep", "b"]).keep == ["a", "b"]
    assert report.removed_channels > 0


def test_input_shapes_take_one_value_per_flag_before_the_model(vgg, tmp_path):
    report = tmp_path / "r.json"
    assert main(["--input-shapes", "input:2,3,16,16", str(vgg), "--ratio", "0.3", "-o", str(tmp_path / "o.onnx"),
                 "--json", str(report), "-q"]) == 0
    assert json.loads(report.read_text())["options"]["resolved"]["input_shapes"] == {"input": [2, 3, 16, 16]}


def test_top_level_help_lists_every_subcommand(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    for command in ("prune", "inspect", "bench", "sweep", "-q", "--version"):
        assert command in out


def test_every_argument_of_every_command_has_help():
    parser = cli._parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    commands = dict(sub.choices)
    assert sorted(commands) == ["bench", "inspect", "prune", "sweep"]
    for name, command in [("onnx-bnslim", parser), *commands.items()]:
        for action in command._actions:
            if isinstance(action, argparse._SubParsersAction):
                continue
            assert action.help and action.help != argparse.SUPPRESS, f"{name} {action.option_strings or action.dest}"


@pytest.mark.parametrize("where", ["first", "after-command", "last"])
def test_version_is_accepted_anywhere(where, vgg, capsys):
    argv = {"first": ["--version", "inspect", str(vgg)], "after-command": ["inspect", "--version", str(vgg)],
            "last": ["inspect", str(vgg), "--version"]}[where]
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 0
    assert capsys.readouterr().out.strip() == f"onnx-bnslim {onnxslim_bn.__version__}"


def test_quiet_prints_nothing_and_still_writes(vgg, tmp_path, capsys):
    assert main([str(vgg), "--ratio", "0.3", "-o", str(tmp_path / "o.onnx"), "-q", "--json", str(tmp_path / "r.json")]) == 0
    captured = capsys.readouterr()
    assert captured.out == "" and captured.err == ""
    assert json.loads((tmp_path / "r.json").read_text())["kind"] == "prune"


def test_verbose_and_quiet_together_is_an_error(vgg, capsys):
    assert main(["-v", "-q", "inspect", str(vgg)]) == 1
    assert "contradict" in capsys.readouterr().err


# ------------------------------------------------------------------ one JSON spelling
def test_json_dash_puts_the_report_on_stdout_and_the_table_on_stderr(vgg, tmp_path, capsys):
    assert main([str(vgg), "--ratio", "0.3", "-o", str(tmp_path / "o.onnx"), "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert data["kind"] == "prune" and data["output"] == str(tmp_path / "o.onnx")
    assert "Check (onnxruntime" in captured.err


@pytest.mark.parametrize("command", ["inspect", "sweep"])
def test_json_path_and_dash_agree(command, vgg, tmp_path, capsys):
    extra = ["--ratios", "0.2"] if command == "sweep" else ["--ratio", "0.2"]
    assert main([command, str(vgg), *extra, "--json", str(tmp_path / "a.json"), "-q"]) == 0
    assert capsys.readouterr().out == ""
    assert main([command, str(vgg), *extra, "--json", "-"]) == 0
    from_stdout = json.loads(capsys.readouterr().out)
    from_file = json.loads((tmp_path / "a.json").read_text())
    for doc in (from_stdout, from_file):
        doc.pop("seconds", None)
    assert from_stdout == from_file and from_file["kind"] == command


def test_json_into_a_missing_folder_fails_before_any_work(vgg, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(cli, "inspect", lambda *a, **k: pytest.fail("inspect ran"))
    assert main(["inspect", str(vgg), "--json", str(tmp_path / "nope" / "a.json")]) == 1
    assert "does not exist" in capsys.readouterr().err


def test_blocked_reasons_carry_codes(vgg, capsys):
    assert main(["inspect", str(vgg), "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["coverage"]["blocked_by_code"] == {"graph-output": 10}
    blocked = [s for s in data["spaces"] if s["blocked"]]
    assert [(s["blocked_code"], s["reasons"][0]["code"]) for s in blocked] == [("graph-output", "graph-output")]


@pytest.mark.parametrize("reason,text,code", [
    (Reason("graph-output", None, "the channels reach the graph output 'y'"),
     "the channels reach the graph output 'y'", "graph-output"),
    (Reason("unknown-op", At("Foo", "n1"), "is not an op onnx-bnslim can follow"),
     "Foo n1 is not an op onnx-bnslim can follow", "unknown-op"),
    (Reason("reshape-channel-axis", At("Reshape", "/head/Reshape_2"), "changes the channel axis ([1, 8, 4, 4] -> [1, 128])"),
     "Reshape /head/Reshape_2 changes the channel axis ([1, 8, 4, 4] -> [1, 128])", "reshape-channel-axis"),
    (Reason("protected", None, "node_Conv_214 is protected by --keep"), "node_Conv_214 is protected by --keep", "protected"),
    (Reason("join-mismatch", At("Add", "a"), "joins tensors whose channel groups differ (8 vs 4)"),
     "Add a joins tensors whose channel groups differ (8 vs 4)", "join-mismatch"),
    (Reason("shape-read", At("Shape", "s"), "reads the channel count (used by Gather g)"),
     "Shape s reads the channel count (used by Gather g)", "shape-read"),
    (Reason("transpose-channel-axis", At("Squeeze", "t"), "moves the channel axis"),
     "Squeeze t moves the channel axis", "transpose-channel-axis"),
])
def test_reason_reads_as_its_message_and_keeps_its_code(reason, text, code):
    assert str(reason) == text and reason.code == code
    with pytest.raises(ValueError, match="unknown reason code"):
        Reason("no-such-code", None, text)


def test_every_blocked_reason_in_the_architecture_fixtures_has_a_code():
    found = {}
    for model in sorted((FIXTURES / "arch").glob("*.onnx"))[::4]:
        for space in onnxslim_bn.inspect(str(model)).spaces:
            for reason in space.reasons:
                found[reason["text"]] = reason["code"]
    assert found and not [text for text, code in found.items() if code == "other"]


# ------------------------------------------------------------------ table, metadata
def test_table_lists_only_changed_ops_and_verbose_lists_all():
    report = onnxslim_bn.prune(str(path("resnet", "ts-folded")), ratio=0.3, verify=False).report
    ops = set(report.before.ops) | set(report.after.ops)
    changed = {op for op in ops if report.before.ops.get(op, 0) != report.after.ops.get(op, 0)}

    def rows(text: str) -> set[str]:
        return {line.split("|")[1].strip() for line in text.splitlines() if line.startswith("| ")} & ops

    assert rows(report.table()) == changed
    assert rows(report.table(verbose=True)) == ops
    assert "Conv" in ops - changed  # the fixture has unchanged op rows to hide


def test_pruned_model_records_tool_version_and_options(vgg, tmp_path):
    out = tmp_path / "o.onnx"
    assert main([str(vgg), "--ratio", "0.3", "--round-to", "1", "--no-probe", "-o", str(out)]) == 0
    meta = {p.key: p.value for p in onnx.load(str(out)).metadata_props}
    assert meta["onnx-bnslim"] == "pruned" and meta["onnx-bnslim.version"] == onnxslim_bn.__version__
    options = json.loads(meta["onnx-bnslim.options"])
    assert options["ratio"] == 0.3 and options["round_to"] == 1 and options["input_shapes"] == {"input": [1, 3, 16, 16]}


# ------------------------------------------------------------------ optional extras
def test_openvino_missing_says_how_to_install_before_any_work(vgg, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)  # import openvino now raises ImportError
    monkeypatch.setattr(cli, "prune", lambda *a, **k: pytest.fail("pruning started"))
    assert main([str(vgg), "--ratio", "0.5", "-o", str(tmp_path / "o.onnx"), "--openvino", str(tmp_path / "ir")]) == 1
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1 and "pip install 'onnx-bnslim[openvino]'" in err
    assert outputs(tmp_path) == ["vgg.onnx"]


def test_bench_without_openvino_times_onnxruntime_or_refuses_up_front(vgg, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "openvino", None)
    pruned = tmp_path / "p.onnx"
    onnxslim_bn.save_model(onnxslim_bn.prune(str(vgg), ratio=0.5, verify=False).model, pruned)
    assert main(["bench", "--runtimes", "openvino", str(vgg), str(pruned)]) == 1
    assert "pip install 'onnx-bnslim[openvino]'" in capsys.readouterr().err
    assert main(["bench", "--batch", "1,2", str(vgg), str(pruned), "--runs", "1", "--warmup", "0", "--json", "-"]) == 0
    captured = capsys.readouterr()
    data = json.loads(captured.out)
    assert [(r["runtime"], r["batch"]) for r in data["rows"]] == [("onnxruntime", 1), ("onnxruntime", 2)]
    assert any("onnx-bnslim[openvino]" in n for n in data["notes"])


def test_plot_without_matplotlib_is_one_line_up_front(vgg, tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    monkeypatch.setattr(cli, "sweep", lambda *a, **k: pytest.fail("sweep started"))
    for argv in (["inspect", str(vgg), "--plot", str(tmp_path / "g.png")],
                 ["sweep", str(vgg), "--plot", str(tmp_path / "s.png")]):
        assert main(argv) == 1
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and "pip install 'onnx-bnslim[plot]'" in err
    assert outputs(tmp_path) == ["vgg.onnx"]


# ------------------------------------------------------------------ back to training
def test_export_widths_matches_the_pruned_weights(tmp_path):
    source = str(path("resnet"))
    out, widths = tmp_path / "o.onnx", tmp_path / "w.json"
    assert main([source, "--ratio", "0.3", "-o", str(out), "--export-widths", str(widths), "-q"]) == 0
    doc = json.loads(widths.read_text())
    assert doc["kind"] == "widths" and doc["schema_version"] == onnxslim_bn.app.report.SCHEMA_VERSION
    before = {t.name: numpy_helper.to_array(t) for t in onnx.load(source).graph.initializer}
    after = {t.name: numpy_helper.to_array(t) for t in onnx.load(str(out)).graph.initializer}
    layers = {layer["weight"]: layer for layer in doc["layers"]}
    assert set(layers) == {n for n in before if n.endswith(".weight") and before[n].ndim in (2, 4)}
    for name, layer in layers.items():
        assert layer["kept"] == len(layer["kept_indices"]) == after[name].shape[0]
        assert layer["original"] == before[name].shape[0]
    assert sum(layer["original"] - layer["kept"] for layer in layers.values()) > 0
    stem = layers["stem.0.weight"]  # its input (the image) is not pruned: the kept rows are the original rows
    np.testing.assert_array_equal(after["stem.0.weight"], before["stem.0.weight"][stem["kept_indices"]])


def test_widths_round_trip_to_torch_matches_the_pruned_onnx(tmp_path):
    pytest.importorskip("torch")  # the fixtures extra; not part of `make test`
    spec = importlib.util.spec_from_file_location("finetune_from_widths", ROOT / "examples" / "finetune_from_widths.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    out, widths = tmp_path / "o.onnx", tmp_path / "w.json"
    assert main([str(path("resnet")), "--ratio", "0.3", "-o", str(out), "--export-widths", str(widths), "-q"]) == 0
    model = example.rebuild(out, widths)
    assert sum(p.numel() for p in model.parameters()) < 165_446  # the original's count: it is the pruned model
    assert example.max_diff(model, out, heldout()[0][:200]) <= 1e-5


# ------------------------------------------------------------------ sweep
def test_sweep_matches_separate_prune_runs(vgg, tmp_path, capsys):
    assert main(["sweep", str(vgg), "--ratios", "0.1,0.4", "--round-to", "1", "--json", str(tmp_path / "s.json")]) == 0
    out = capsys.readouterr().out
    assert "Max rel. error" in out and "Top-1 agreement" in out
    points = json.loads((tmp_path / "s.json").read_text())["points"]
    assert [p["value"] for p in points] == [0.1, 0.4]
    for p in points:
        alone = onnxslim_bn.prune(str(vgg), ratio=p["value"], round_to=1).report
        scale = max(o.max_abs_value for o in alone.verification.outputs)
        assert p["macs"] == alone.after.macs and p["parameters"] == alone.after.parameters
        assert p["removed_channels"] == alone.removed_channels
        assert p["max_abs_diff"] == pytest.approx(alone.verification.max_abs_diff, rel=1e-6, abs=1e-9)
        assert p["max_rel_error"] == pytest.approx(alone.verification.max_abs_diff / scale, rel=1e-6, abs=1e-9)
    assert points[1]["macs"] < points[0]["macs"]
    assert outputs(tmp_path) == ["s.json", "vgg.onnx"]  # no model files


def test_sweep_by_target_macs_keeps_each_budget(vgg, tmp_path, capsys):
    assert main(["sweep", str(vgg), "--target-macs", "0.8,0.6", "--json", "-"]) == 0
    data = json.loads(capsys.readouterr().out)
    original = data["original"]["macs"]
    assert [p["budget"] for p in data["points"]] == ["target_macs", "target_macs"]
    for p in data["points"]:
        assert p["error"] is None and p["macs"] <= p["value"] * original


def test_sweep_latency_times_every_budget_when_asked(vgg, capsys):
    assert main(["sweep", str(vgg), "--ratios", "0.2,0.5", "--latency", "--json", "-"]) == 0
    points = json.loads(capsys.readouterr().out)["points"]
    assert all(p["speedup"] is not None and p["speedup"] > 0 for p in points)  # measured, never asserted faster
    assert main(["sweep", str(vgg), "--ratios", "0.2", "--json", "-"]) == 0
    assert json.loads(capsys.readouterr().out)["points"][0]["speedup"] is None  # only when asked


def test_sweep_plot_writes_a_png(vgg, tmp_path):
    pytest.importorskip("matplotlib")
    png = tmp_path / "s.png"
    assert main(["sweep", str(vgg), "--ratios", "0.2,0.5", "--data", HELDOUT, "--plot", str(png), "-q"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


# ------------------------------------------------------------------ the score histogram
def test_dead_cluster_is_found_in_sparse_scores_and_not_in_plain_ones():
    rng = np.random.default_rng(0)
    dead = 10 ** rng.normal(-6.5, 0.6, 120)
    live = 10 ** rng.normal(-1.3, 0.35, 280)
    cluster = dead_cluster(np.concatenate([live, dead]))
    assert cluster is not None and cluster.channels == 120 and cluster.below == dead.max()
    assert dead_cluster(np.abs(rng.normal(0.5, 0.2, 400))) is None


def test_inspect_hist_marks_the_cut_and_the_dead_cluster(capsys):
    assert main(["inspect", str(path("mobilenetv2")), "--threshold", "1e-3", "--hist"]) == 0
    out = capsys.readouterr().out
    assert "<- cut" in out and "<- dead cluster ends" in out and "cut at 0.001" in out
    assert main(["inspect", str(path("mobilenetv2")), "--threshold", "1e-3", "--json", "-"]) == 0
    summary = json.loads(capsys.readouterr().out)["histogram"]
    dead = summary["dead_cluster"]
    # the fixture recorded 391 BN channels below 1e-3 (manifest); the split lands near it, all below 1e-3
    assert 0.9 * 391 <= dead["channels"] <= 391 and dead["below"] < 1e-3 < dead["above"] * 10


def test_inspect_plot_writes_a_png(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    png = tmp_path / "g.png"
    assert main(["inspect", str(path("resnet", "dynamo-folded")), "--ratio", "0.3", "--plot", str(png)]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert f"Wrote the score histogram to {png}" in capsys.readouterr().out


def test_inspect_labels_spaces_by_weight_name(dynamo, capsys):
    assert main(["inspect", str(dynamo)]) == 0
    out = capsys.readouterr().out
    assert "layers.0.conv1.weight" in out and "node_Conv_" not in out.split("Coverage:")[0]

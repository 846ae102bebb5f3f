"""The JSON documents are a contract: their key sets are stored in tests/report_schema.json with
the SCHEMA_VERSION they belong to. Changing a key without bumping the version fails here.

After a deliberate change: bump ``onnxslim_bn.app.report.SCHEMA_VERSION``, then rewrite the stored
key sets with ``python -m tests.test_schema`` and commit both.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

import onnxslim_bn
from onnxslim_bn.app.bench import benchmark
from onnxslim_bn.app.cli import main
from onnxslim_bn.app.report import SCHEMA_VERSION, envelope, export_widths
from onnxslim_bn.ir.openvino_ir import OpenVinoResult
from onnxslim_bn.passes.collapse import Collapse
from onnxslim_bn.passes.openvino_int8 import NncfSettings
from onnxslim_bn.passes.quantize import step_metrics
from tests.fixtures import heldout, path

STORED = Path(__file__).with_name("report_schema.json")
# maps keyed by data (op types, node names, input names, codes, reasons, timings, the options a
# caller happened to give): their keys are not part of the schema, their place is
DATA_KEYED = {"ops", "layers", "blocked_by_code", "blocked_by_reason", "seconds", "given", "input_shapes", "by_kind"}


def key_paths(doc, prefix: str = "") -> set[str]:
    """Every key path of a JSON document: ``a.b``, ``list[].key``; data-keyed maps as ``a.*``."""
    out: set[str] = set()
    if isinstance(doc, dict):
        for key, value in doc.items():
            here = f"{prefix}.{key}" if prefix else key
            out.add(here)
            if key in DATA_KEYED and isinstance(value, dict):
                out.add(f"{here}.*")
            else:
                out |= key_paths(value, here)
    elif isinstance(doc, list):
        for item in doc:
            out |= key_paths(item, f"{prefix}[]")
    return out


def documents(tmp: Path) -> dict[str, dict]:
    """One document of each kind, with every optional part filled in."""
    model = str(path("vgg"))
    result = onnxslim_bn.prune(model, ratio=0.3)
    # the part --quantize int8 adds, with the sensitivity search's findings (densenet: INT8 error well above
    # quantize.SMALL_ERROR, so the per-node list is filled)
    int8 = onnxslim_bn.prune(str(path("densenet")), threshold=1e-3, quantize="int8",
                             data={"input": heldout()[0][:128]}, compensation="bias")
    # the part --openvino adds, as the NNCF route fills it (its check against the original, NNCF's settings)
    result.report.openvino = OpenVinoResult(
        "ir/vgg.xml", False, 0.0, 1.0, True, route="nncf", compared_with="the FP32 original",
        check={**step_metrics(int8.report.verification), "tolerance": 0.02, "inputs": "64 samples"},
        quantizer=NncfSettings().to_dict())
    assert int8.report.quantization["sensitivity"]["most_sensitive"]
    result.report.quantization = int8.report.quantization
    result.report.collapse = Collapse(0.5, 0.4, 0.8, 0.3, 0.075, [{"what": "as asked", "agreement": 0.4, "cosine": 0.8,
                                                               "collapsed": True, "chosen": True}])  # a collapsed check
    result.report.output = str(tmp / "vgg.slim.onnx")
    onnxslim_bn.save_model(result.model, tmp / "vgg.slim.onnx")
    docs = {"prune": result.report.to_dict(), "widths": export_widths(result.report)}
    for kind, argv in (("inspect", ["inspect", model, "--ratio", "0.3"]), ("sweep", ["sweep", model, "--ratios", "0.3"])):
        assert main([*argv, "--json", str(tmp / f"{kind}.json"), "-q"]) == 0
        docs[kind] = json.loads((tmp / f"{kind}.json").read_text())
    bench = benchmark(model, tmp / "vgg.slim.onnx", batches=(1,), runs=1, warmup=0, runtimes=("onnxruntime",))
    docs["bench"] = envelope("bench", bench.to_dict())
    return docs


def current(tmp: Path) -> dict[str, list[str]]:
    return {kind: sorted(key_paths(doc)) for kind, doc in documents(tmp).items()}


@pytest.fixture(scope="module")
def now(tmp_path_factory) -> dict[str, list[str]]:
    return current(tmp_path_factory.mktemp("schema"))


def test_every_document_names_its_schema_and_tool_version(now):
    for kind, keys in now.items():
        assert {"schema_version", "tool_version", "kind"} <= set(keys), kind


def test_key_sets_change_only_with_a_schema_version_bump(now):
    stored = json.loads(STORED.read_text())
    if stored["schema_version"] != SCHEMA_VERSION:
        pytest.fail(f"SCHEMA_VERSION is {SCHEMA_VERSION}, the stored key sets are for {stored['schema_version']}: "
                    "rewrite them with `python -m tests.test_schema`")
    for kind in sorted(set(now) | set(stored["documents"])):
        was, got = set(stored["documents"].get(kind, [])), set(now.get(kind, []))
        assert got == was, (f"the '{kind}' JSON changed without a SCHEMA_VERSION bump: added {sorted(got - was)}, "
                            f"removed {sorted(was - got)}; bump onnxslim_bn.app.report.SCHEMA_VERSION and run "
                            "`python -m tests.test_schema`")


def test_the_key_path_walk_sees_a_renamed_key():
    before = key_paths({"a": {"b": [{"c": 1}]}, "ops": {"Conv": 3}})
    after = key_paths({"a": {"b": [{"d": 1}]}, "ops": {"Relu": 1}})
    assert before ^ after == {"a.b[].c", "a.b[].d"}


if __name__ == "__main__":  # rewrite the stored key sets (after bumping SCHEMA_VERSION)
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        STORED.write_text(json.dumps({"schema_version": SCHEMA_VERSION, "documents": current(Path(tmp))},
                                     indent=1, sort_keys=True) + "\n")
    print(f"wrote {STORED}", file=sys.stderr)

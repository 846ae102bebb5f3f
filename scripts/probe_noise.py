"""How often does the probe call a pruned model slower, with and without the A/A band?

    # 1. prune every model once, probe off (the models timed by both checkouts are the same files)
    PYTHONPATH=. python scripts/probe_noise.py prune OUT_DIR fixtures/*.onnx /work/reportset/tuning/*.onnx
    # 2. time them with a checkout's probe: the pruned model, and the original itself as 'pruned'
    PYTHONPATH=CHECKOUT python scripts/probe_noise.py time OUT_DIR RESULT.json --repeats 3
    # 3. the counts
    python scripts/probe_noise.py count RESULT.json [RESULT.json ...]

Sparse-trained models (fixtures, and the report set's ``*_sparse``) are pruned with
``--threshold 1e-3``; the report set's ordinary models with ``--target-macs 0.9 --data calib.npz``.
A checkout whose probe has no band (before) calls a model slower by its rules then: 'not faster'
(ratio above 1.00, the warning) and 'acts' (above 1.05, the re-prune). With the band the verdict is
the probe's own.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import onnx


def _settings(path: Path) -> dict:
    manifest = path.parent / "manifest.json"
    if manifest.exists() and "reportset" in str(path):
        info = json.loads(manifest.read_text())["models"][path.name.split(".")[0]]
        if info["kind"] == "ordinary":
            return {"target_macs": 0.9, "data": str(path.parent / "calib.npz")}
    return {"threshold": 1e-3}


def prune_all(out: Path, models: list[Path]) -> None:
    from onnxslim_bn import prune

    out.mkdir(parents=True, exist_ok=True)
    listed = []
    for path in models:
        name = f"{path.parent.name}.{path.stem}"
        try:
            result = prune(str(path), probe=False, verify=False, **_settings(path))
        except Exception as exc:  # noqa: BLE001 -- a model that does not prune is listed, not fatal
            print(f"{name}: {exc}".splitlines()[0][:200], file=sys.stderr)
            continue
        if not result.report.removed_channels:
            print(f"{name}: nothing removed", file=sys.stderr)
            continue
        onnx.save(result.model, str(out / f"{name}.pruned.onnx"))
        before, after = result.report.before, result.report.after
        listed.append({"name": name, "original": str(path.resolve()), "pruned": str(out / f"{name}.pruned.onnx"),
                       "macs_kept": after.macs / before.macs})
        print(f"{name}: MACs kept {after.macs / before.macs:.3f}", file=sys.stderr)
    (out / "models.json").write_text(json.dumps(listed, indent=1))


def time_all(out: Path, result: Path, repeats: int) -> None:
    import onnxslim_bn
    from onnxslim_bn.app.bench import probe, probe_inputs

    rows = []
    for entry in json.loads((out / "models.json").read_text()):
        original = onnx.load(entry["original"])
        pruned = onnx.load(entry["pruned"])
        feeds = probe_inputs(original)
        for pair, other in (("pruned", pruned), ("itself", original)):
            for k in range(repeats):
                clock = time.perf_counter()
                found = probe(original, other, feeds)
                d = found.to_dict()
                rows.append({"name": entry["name"], "macs_kept": entry["macs_kept"] if pair == "pruned" else 1.0,
                             "pair": pair, "repeat": k, "ratio": found.pruned_ms / found.original_ms,
                             "verdict": d.get("verdict"), "band": d.get("band"),
                             "seconds": time.perf_counter() - clock})
        print(f"{entry['name']}: " + ", ".join(f"{r['pair']} {r['ratio']:.3f} {r['verdict'] or ''}"
                                               for r in rows if r["name"] == entry["name"]), file=sys.stderr)
    result.write_text(json.dumps({"checkout": str(Path(onnxslim_bn.__file__).parent.parent), "rows": rows}, indent=1))


def count(results: list[Path]) -> None:
    for path in results:
        doc = json.loads(path.read_text())
        rows = doc["rows"]
        print(f"{path} ({doc['checkout']}): {len(rows)} probes")
        for pair in ("pruned", "itself"):
            these = [r for r in rows if r["pair"] == pair]
            kept1 = [r for r in these if r["macs_kept"] >= 0.995]
            for label, group in ((f"{pair}", these), (f"{pair}, MACs kept >= 0.995", kept1 if pair == "pruned" else [])):
                if not group:
                    continue
                n = len(group)
                not_faster = sum(r["ratio"] >= 1.0 for r in group)
                acts = sum(r["ratio"] > 1.05 for r in group)
                banded = [r for r in group if r["verdict"]]
                line = (f"  {label}: {n} probes; ratio range {min(r['ratio'] for r in group):.2f}-"
                        f"{max(r['ratio'] for r in group):.2f}; rules before: not faster {not_faster}/{n}, "
                        f"above 1.05 (acted) {acts}/{n}")
                if banded:
                    slower = sum(r["verdict"] == "slower" for r in banded)
                    same = sum(r["verdict"] == "same" for r in banded)
                    faster = sum(r["verdict"] == "faster" for r in banded)
                    highs = sorted(r["band"]["high"] for r in banded)
                    line += (f"; the band: slower {slower}/{n}, same {same}/{n}, faster {faster}/{n} "
                             f"(band's upper edge median {highs[len(highs) // 2]:.3f}, max {highs[-1]:.3f})")
                print(line)
        print(f"  seconds per probe: {sum(r['seconds'] for r in rows) / len(rows):.2f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("prune")
    p.add_argument("out", type=Path)
    p.add_argument("models", type=Path, nargs="+")
    t = sub.add_parser("time")
    t.add_argument("out", type=Path)
    t.add_argument("result", type=Path)
    t.add_argument("--repeats", type=int, default=3)
    c = sub.add_parser("count")
    c.add_argument("results", type=Path, nargs="+")
    args = parser.parse_args()
    if args.cmd == "prune":
        prune_all(args.out, args.models)
    elif args.cmd == "time":
        time_all(args.out, args.result, args.repeats)
    else:
        count(args.results)


if __name__ == "__main__":
    main()

"""Command line: ``onnx-bnslim MODEL --ratio R`` and ``onnx-bnslim inspect MODEL``."""

from __future__ import annotations

import argparse
import gc
import json
import logging
import sys
import time
from pathlib import Path

from . import __version__
from .api import inspect, prune, to_openvino
from .bench import RUNTIMES, benchmark
from .errors import BnSlimError
from .model_io import save_model, write_text
from .plan import PruneOptions
from .report import inspect_table
from .shapes import parse_input_shapes


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .onnx model (never modified)")
    parser.add_argument("--input-shapes", nargs="+", metavar="NAME:D0,D1,..",
                        help="fix dynamic input dims for the check and MAC counts (default: batch 1, other dims 224)")
    parser.add_argument("--keep", nargs="+", default=[], metavar="PATTERN",
                        help="never prune layers whose node name matches (fnmatch), e.g. --keep '/head/*'")
    parser.add_argument("--min-channels", type=int, default=4, help="channels a layer keeps at least (default 4)")
    parser.add_argument("--round-to", type=int, default=8,
                        help="round kept widths up to a multiple of N, in layers of at least 4N channels (default 8; 1 = exact ratio)")
    parser.add_argument("-v", "--verbose", action="store_true", help="per-layer detail and debug logging")


def _prune_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-bnslim",
        description="Remove the channels with the smallest BatchNorm scale (Network Slimming) from an ONNX model, "
                    "then check the result against the original with onnxruntime. "
                    "`onnx-bnslim inspect MODEL` shows what would be pruned and why layers are left alone.")
    _common(parser)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float, help="fraction of all prunable channels to remove, ranked globally")
    how.add_argument("--threshold", type=float, help="remove every channel whose |scale| is below this instead")
    parser.add_argument("-o", "--output", help="output path (default: <model>.slim.onnx beside the input)")
    parser.add_argument("--data", help=".npz of real inputs (arrays named after the model inputs) for the check")
    parser.add_argument("--max-error", type=float, help="fail, writing nothing, if max |pruned - original| exceeds this")
    parser.add_argument("--exact-borders", action="store_true",
                        help="compensate removed channels exactly at the borders of padded convs too "
                             "(adds an Add of a constant map per such layer; needs static image sizes)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison (the checker still runs)")
    parser.add_argument("--report", help="write the report as JSON to this path")
    parser.add_argument("--openvino", metavar="OUT_DIR", help="also write OpenVINO IR here, checked against onnxruntime")
    parser.add_argument("--fp16", action="store_true", help="with --openvino: compress the IR weights to FP16")
    parser.add_argument("--version", action="version", version=f"onnx-bnslim {__version__}")
    return parser


def _inspect_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="onnx-bnslim inspect",
                                     description="Show the channel spaces of a model, their scale statistics, and why any are blocked.")
    _common(parser)
    parser.add_argument("--ratio", type=float, help="also show what each space would lose at this ratio")
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parser


def _bench_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-bnslim bench",
        description="Latency of the original and the pruned model, interleaved, in onnxruntime and OpenVINO, "
                    "with the speed-up the MAC count promises.")
    parser.add_argument("original")
    parser.add_argument("pruned")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 32], help="batch sizes (default 1 32)")
    parser.add_argument("--threads", type=int, help="threads per runtime (default: all cores)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--runtimes", nargs="+", default=list(RUNTIMES), choices=list(RUNTIMES))
    parser.add_argument("--input-shapes", nargs="+", metavar="NAME:D0,D1,..", help="fix dynamic non-batch dims")
    parser.add_argument("--json", help="also write the result as JSON to this path")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    return parser


def run_bench(argv: list[str]) -> int:
    args = _bench_parser().parse_args(argv)
    result = benchmark(args.original, args.pruned, tuple(args.batch), args.threads, args.runs, args.warmup,
                       tuple(args.runtimes), parse_input_shapes(args.input_shapes), progress=sys.stderr.isatty())
    print(f"onnx-bnslim bench: {args.original} vs {args.pruned}, {result.threads} threads, "
          f"{result.runs} interleaved runs each; median (10th-90th percentile)")
    print(result.table(markdown=args.markdown))
    if args.json:
        write_text(Path(args.json), json.dumps(result.to_dict(), indent=2) + "\n")
    return 0


def _output_path(model: str, output: str | None) -> Path:
    src = Path(model)
    out = Path(output) if output else src.with_name(src.stem + ".slim.onnx")
    if out.exists() and src.exists() and out.resolve() == src.resolve():
        raise BnSlimError(f"{out}: the output would overwrite the input model; pass another -o")
    _check_folder(out, "-o")
    return out


def _check_folder(path: Path, flag: str) -> None:
    """Fail before any work when an output could not be written at the end."""
    if not path.parent.is_dir():
        raise BnSlimError(f"{path}: the output folder {path.parent} does not exist; create it or pass another {flag}")


def _options(args: argparse.Namespace, **extra) -> PruneOptions:
    return PruneOptions(min_channels=args.min_channels, round_to=args.round_to, keep=args.keep,
                        input_shapes=parse_input_shapes(args.input_shapes), **extra)


def run_prune(argv: list[str]) -> int:
    args = _prune_parser().parse_args(argv)
    _logging(args.verbose)
    out = _output_path(args.model, args.output)
    if args.report:
        _check_folder(Path(args.report), "--report")
    options = _options(args, ratio=args.ratio, threshold=args.threshold, data=args.data,
                       max_error=args.max_error, verify=not args.no_verify, exact_borders=args.exact_borders)
    if args.fp16 and not args.openvino:
        raise BnSlimError("--fp16 applies to the OpenVINO IR: add --openvino OUT_DIR")
    if args.openvino and args.no_verify:
        raise BnSlimError("--openvino checks OpenVINO against onnxruntime on the check's inputs: drop --no-verify")
    result = prune(args.model, options)
    gc.collect()  # the original model is garbage now, held only by graph reference cycles: free it before saving
    if args.openvino:
        to_openvino(result, args.openvino, out.stem, fp16=args.fp16)
    result.report.output = str(out)
    clock = time.perf_counter()
    result.report.after.size_bytes = save_model(result.model, out)
    result.report.seconds["save"] = time.perf_counter() - clock
    print(f"onnx-bnslim {__version__}: {args.model} -> {out}")
    print(result.report.table(verbose=args.verbose))
    if args.report:
        write_text(Path(args.report), result.report.to_json() + "\n")
    return 0


def run_inspect(argv: list[str]) -> int:
    args = _inspect_parser().parse_args(argv)
    _logging(args.verbose)
    result = inspect(args.model, ratio=args.ratio, options=_options(args))
    if args.json:
        from dataclasses import asdict

        from .report import coverage
        print(json.dumps({"spaces": [asdict(s) for s in result.spaces], "coverage": coverage(result.spaces),
                          "notes": result.notes}, indent=2))
    else:
        print(inspect_table(result.spaces, result.ratio))
        for note in result.notes:
            print(f"Note: {note}")
    return 0


def _logging(verbose: bool) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s")


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    try:
        if argv[:1] == ["inspect"]:
            return run_inspect(argv[1:])
        if argv[:1] == ["bench"]:
            return run_bench(argv[1:])
        return run_prune(argv)
    except BnSlimError as exc:
        print(f"onnx-bnslim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

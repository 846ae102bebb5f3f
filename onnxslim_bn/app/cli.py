"""Command line: ``onnx-bnslim [prune] MODEL --ratio R``, ``inspect``, ``bench``, ``sweep``.

One top-level parser with a subcommand per job; ``prune`` is the default when the first word
is a model. Global options (``-v``, ``-q``, ``--version``) are accepted anywhere. Options that
take several values take one per flag (``--keep A --keep B``) or a comma list (``--batch 1,32``),
so that none of them swallows the model path.
"""

from __future__ import annotations

import argparse
import gc
import logging
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import BnSlimError, CheckFailed
from ..ir.model_io import STDOUT, check_run_files, save_model, target, write_text
from ..ir.openvino_ir import INSTALL_HINT as OPENVINO_HINT
from ..ir.openvino_ir import available as openvino_available
from ..ir.openvino_ir import require as require_openvino
from ..ir.shapes import parse_input_shapes
from ..options import PruneOptions
from ..passes.openvino_int8 import ROUTES as OPENVINO_INT8_ROUTES
from ..passes.openvino_int8 import require as require_nncf
from ..passes.quantize import MODES as QUANTIZE_MODES
from ..passes.quantize import quantize_files
from ..version import __version__
from .api import inspect, prune, to_openvino
from .bench import RUNTIMES, benchmark, benchmark_four_way
from .histogram import ascii_histogram, plot_histogram, require_matplotlib
from .histogram import summary as score_summary
from .report import coverage, dumps, envelope, export_widths, inspect_table
from .sweep import plot_sweep, sweep

COMMANDS = ("prune", "inspect", "bench", "sweep")
GLOBAL_FLAGS = ("-v", "--verbose", "-q", "--quiet")


def _global(parser: argparse.ArgumentParser, top: bool = False) -> None:
    """-v / -q / --version, on the top-level parser and on every subcommand (anywhere on the line).

    On subcommands the defaults are suppressed, so a flag given before the subcommand survives."""
    default = {} if top else {"default": argparse.SUPPRESS}
    parser.add_argument("-v", "--verbose", action="store_true", **default,
                        help="more detail: every op row and the per-layer table, debug logging")
    parser.add_argument("-q", "--quiet", action="store_true", **default,
                        help="print nothing but errors (use with --json PATH / -o for scripts)")
    parser.add_argument("--version", action="version", version=f"onnx-bnslim {__version__}",
                        help="print the version and exit")


def _shape_specs(values: list[str] | None) -> list[str]:
    """--input-shapes values, one per flag; a value may also hold several separated by spaces."""
    return [spec for value in values or [] for spec in value.split()]


def _number_list(kind: type):
    def parse(text: str) -> list:
        try:
            return [kind(v) for v in text.split(",") if v.strip()]
        except ValueError:
            raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of {kind.__name__} values") from None
    return parse


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model", help="the .onnx model (never modified)")
    parser.add_argument("--input-shapes", action="append", metavar="NAME:D0,D1,..",
                        help="fix dynamic input dims for the check and MAC counts, one input per flag "
                             "(default: batch 1, other dims 224)")
    parser.add_argument("--keep", "--protect", dest="keep", action="append", default=[], metavar="PATTERN",
                        help="never prune the layers whose node name or weight name matches (fnmatch), one pattern "
                             "per flag, e.g. --keep 'layer4.*' --keep '/head/*'; a pattern matching no layer is an error")
    parser.add_argument("--min-channels", type=int, default=4, help="channels a layer keeps at least (default 4)")
    parser.add_argument("--round-to", default="auto", metavar="N|auto",
                        help="round kept widths to a multiple of N, up or down, whichever keeps the total nearest "
                             "the selection (default auto: the machine's convolution channel block, 16 with AVX-512, "
                             "8 with AVX2; 1 = the exact ratio)")


def _data_flags(parser: argparse.ArgumentParser) -> None:
    """--data and --preprocess (onnxslim_bn.ir.data)."""
    parser.add_argument("--data", metavar="PATH",
                        help="real inputs for calibration and the check: an .npz (arrays named after the model "
                             "inputs, samples on axis 0), an .npy, a folder of images (see --preprocess) or of .npy "
                             "samples; calibration and check samples are kept apart")
    parser.add_argument("--preprocess", action="append", metavar="KEY=VALUE",
                        help="for a folder of images: size=H,W resize=S scale=1/255 mean=M[,M,M] std=S[,S,S] "
                             "order=RGB|BGR layout=NCHW|NHWC; pixel -> (pixel * scale - mean) / std; "
                             "one or several per flag, e.g. --preprocess 'mean=0.485,0.456,0.406 std=0.229,0.224,0.225'")


def _preprocess(args: argparse.Namespace) -> str | None:
    """--preprocess values joined into one spec (onnxslim_bn.ir.data.parse_preprocess)."""
    return " ".join(args.preprocess) if getattr(args, "preprocess", None) else None


PRUNE_HELP = ("Remove the channels with the smallest BatchNorm scale (Network Slimming) from an ONNX model, "
              "then check the result against the original with onnxruntime. "
              "`onnx-bnslim inspect MODEL` shows what would be pruned and why layers are left alone.")


def _prune_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _common(parser)
    how = parser.add_mutually_exclusive_group(required=True)
    how.add_argument("--ratio", type=float,
                     help="cut the global ranking at this fraction of the removable channels (scored, with a "
                          "known replacement at every reader): the channels below the cut go, except those a "
                          "constraint holds (no channel above the cut replaces them)")
    how.add_argument("--threshold", type=float, help="remove every channel whose score is below this instead")
    how.add_argument("--target-macs", type=float, metavar="F",
                     help="keep at most fraction F of the MACs (0 < F < 1), channels ranked by importance per MAC")
    how.add_argument("--target-params", type=float, metavar="F",
                     help="keep at most fraction F of the layer parameters, ranked by importance per parameter")
    how.add_argument("--target-latency", type=float, metavar="F",
                     help="keep at most fraction F of the original's latency on --runtime at --latency-batch: "
                          "channels ranked by importance per millisecond from a per-layer latency table measured "
                          "here (cached), the result timed and the cut tightened when it misses")
    parser.add_argument("--runtime", choices=("onnxruntime", "openvino"), default="onnxruntime",
                        help="for --target-latency: the runtime you deploy with (default onnxruntime)")
    parser.add_argument("--latency-batch", type=int, default=1, metavar="N",
                        help="for --target-latency: the batch size you deploy with (default 1)")
    parser.add_argument("--threads", type=int, metavar="N",
                        help="for --target-latency and the probe: runtime threads (default: all cores)")
    parser.add_argument("--no-probe", dest="probe", action="store_false",
                        help="skip the quick timing of original against pruned (onnxruntime, beside the original "
                             "timed against itself: the A/A noise band) that, when the pruned model is slower beyond "
                             "that band, prunes again keeping the layers it blames and warns if nothing is faster")
    parser.add_argument("--importance", choices=("auto", "gamma", "data"), default="auto",
                        help="rank channels by |BN scale| (gamma, Network Slimming) or by their measured cost at the "
                             "layers reading them (data, needs --data); default auto: data when --data is given "
                             "and the scales show no dead cluster (a model not trained with the L1 penalty)")
    parser.add_argument("--max-layer-ratio", type=float, default=None, metavar="F",
                        help="a layer loses at most fraction F of its live channels (default 0.75 for --ratio / "
                             "--threshold, 0.4 for a budget; channels in the scores' dead cluster are not limited)")
    parser.add_argument("-o", "--output", help="output path (default: <model>.slim.onnx beside the input)")
    _data_flags(parser)
    parser.add_argument("--calibration-samples", type=int, metavar="N",
                        help="with --data: the first N samples calibrate, the rest check (default: the first half; "
                             "data under 64 samples serves both, with a note)")
    parser.add_argument("--check-samples", type=int, default=32, metavar="N",
                        help="without --data: seeded N(0,1) samples for the check (default 32)")
    parser.add_argument("--max-error", type=float,
                        help="fail (exit 1, no model written, --report still written) if max |pruned - original| "
                             "exceeds this on any output")
    parser.add_argument("--max-rel-error", type=float,
                        help="fail likewise if max |pruned - original| / max |original| exceeds this on any output")
    parser.add_argument("--min-cosine", type=float,
                        help="fail likewise if the cosine similarity of any output falls below this, e.g. 0.99")
    parser.add_argument("--exact-borders", action="store_true",
                        help="compensate removed channels exactly at the borders of padded convs too "
                             "(adds an Add of a constant map per such layer; needs static image sizes)")
    parser.add_argument("--allow-growth", action="store_true",
                        help="accept a model larger than the input (a weight shared by layers that keep different "
                             "channels is written once per slice, a new bias outweighs a removed channel; refused by "
                             "default)")
    parser.add_argument("--compensation", choices=("auto", "bias", "reconstruct"), default="auto",
                        help="for removed channels: fold their constants into the next layers' bias, or refit the "
                             "next layers by least squares on the calibration data (default auto: reconstruct "
                             "with --data, else bias)")
    parser.add_argument("--no-verify", action="store_true", help="skip the onnxruntime comparison (the checker still runs)")
    parser.add_argument("--json", "--report", dest="json", metavar="PATH",
                        help="write the report as JSON to PATH ('-' for stdout; the table then goes to stderr)")
    parser.add_argument("--export-widths", metavar="PATH",
                        help="write per layer the weight name, original and kept width and the kept channel "
                             "indices as JSON, to rebuild the pruned model in the training code")
    _quantize_flag(parser)
    parser.add_argument("--openvino", metavar="OUT_DIR",
                        help="also write OpenVINO IR here, checked against onnxruntime (with --quantize int8 and "
                             "nncf installed: NNCF's INT8 IR of the pruned FP32 model, checked against the original)")
    parser.add_argument("--fp16", action="store_true", help="with --openvino: compress the IR weights to FP16")
    parser.add_argument("--openvino-int8", choices=OPENVINO_INT8_ROUTES, default="auto",
                        help="with --openvino and --quantize int8: the INT8 IR by nncf (NNCF quantizes the pruned "
                             "FP32 model in OpenVINO; needs pip install 'onnx-bnslim[nncf]') or qdq (OpenVINO reads "
                             "the onnxruntime INT8 model); default auto: nncf when installed, else qdq")
    return parser


def _quantize_flag(parser: argparse.ArgumentParser) -> None:
    """--quantize (onnxslim_bn.passes.quantize)."""
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, metavar="int8",
                        help="after pruning, quantize to INT8 (onnxruntime QDQ, per-channel int8 weights, uint8 "
                             "activations on x86) calibrated on the calibration share of --data (needed); the check "
                             "then compares the INT8 model with the FP32 original and reports each step "
                             "(default output <model>.slim.int8.onnx)")
    parser.add_argument("--int8-fp32", default="auto", metavar="auto|N",
                        help="with --quantize: keep at most N nodes in FP32 where their quantization dominates the "
                             "INT8 error, measured node by node against the FP32 model on calibration samples "
                             "(default auto: up to 4, only while one removes at least a fifth of the error; 0: none)")


INSPECT_HELP = "Show the channel spaces of a model, their scale statistics, and why any are blocked."


def _inspect_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _common(parser)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--ratio", type=float, help="also show what each space would lose at this ratio")
    how.add_argument("--threshold", type=float, help="or: what each space would lose at this |scale| threshold")
    _data_flags(parser)  # for the scales of layers whose BN was folded away
    parser.add_argument("--json", metavar="PATH", help="write the spaces as JSON to PATH ('-' for stdout)")
    parser.add_argument("--hist", action="store_true",
                        help="also print a histogram of the channel scores (log scale) with the cut and the dead cluster")
    parser.add_argument("--plot", metavar="PNG",
                        help="draw the histogram of scores per source kind (log scale) with the cut line and the dead "
                             "cluster to this PNG (needs matplotlib: pip install 'onnx-bnslim[plot]')")
    return parser


BENCH_HELP = ("Latency of the original and the pruned model, interleaved, in onnxruntime and OpenVINO, "
              "with the speed-up the MAC count promises and the A/A noise band (the original timed against "
              "a copy of itself).")


def _bench_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    parser.add_argument("original", help="the original .onnx model")
    parser.add_argument("pruned", help="the pruned .onnx model")
    parser.add_argument("--batch", type=_number_list(int), action="extend",
                        help="batch sizes, comma-separated or one per flag (default 1,32)")
    parser.add_argument("--threads", type=int, help="threads per runtime (default: all cores)")
    parser.add_argument("--runs", type=int, default=30, help="timed runs per model (default 30)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed runs first (default 5)")
    parser.add_argument("--runtimes", type=_number_list(str), action="extend",
                        help=f"runtimes, comma-separated or one per flag, from {', '.join(RUNTIMES)} "
                             "(default: each one installed; openvino needs pip install 'onnx-bnslim[openvino]')")
    parser.add_argument("--input-shapes", action="append", metavar="NAME:D0,D1,..",
                        help="fix dynamic non-batch dims, one input per flag")
    parser.add_argument("--data", metavar="PATH",
                        help="time on these inputs instead of seeded random ones (the forms prune --data reads; "
                             "the first samples make each batch): needed for models with integer inputs; "
                             "with --quantize also the INT8 models' calibration samples")
    parser.add_argument("--preprocess", action="append", metavar="KEY=VALUE",
                        help="for a --data folder of images, as in prune")
    parser.add_argument("--json", metavar="PATH", help="also write the result as JSON to PATH ('-' for stdout)")
    parser.add_argument("--markdown", action="store_true", help="print a Markdown table")
    parser.add_argument("--quantize", choices=QUANTIZE_MODES, metavar="int8",
                        help="the four-way table: FP32, slim, INT8 alone and slim + INT8, both FP32 models quantized "
                             "here as prune --quantize does, on the calibration share of --data (needed)")
    parser.add_argument("--calibration-samples", type=int, metavar="N",
                        help="with --quantize: the first N samples of --data calibrate (default: the first half, as prune)")
    parser.add_argument("--int8-fp32", default="auto", metavar="auto|N",
                        help="with --quantize: nodes kept in FP32 by sensitivity, as prune --int8-fp32")
    return parser


SWEEP_HELP = ("Prune at a series of budgets in memory (no files written) and print one table: MACs, parameters, "
              "max relative error, cosine and top-1 agreement per budget, to choose the trade-off by looking.")


def _sweep_parser(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    _common(parser)
    how = parser.add_mutually_exclusive_group()
    how.add_argument("--ratios", type=_number_list(float), action="extend",
                     help="ratios to try, comma-separated (default 0.1,0.2,...,0.8)")
    how.add_argument("--thresholds", type=_number_list(float), action="extend",
                     help="or: |scale| thresholds to try, comma-separated, e.g. 1e-4,1e-3,1e-2")
    how.add_argument("--target-macs", type=_number_list(float), action="extend",
                     help="or: fractions of the MACs to keep, comma-separated, e.g. 0.8,0.6,0.4")
    how.add_argument("--target-params", type=_number_list(float), action="extend",
                     help="or: fractions of the layer parameters to keep, comma-separated")
    _data_flags(parser)  # calibration and the check at every budget
    _quantize_flag(parser)
    parser.add_argument("--latency", action="store_true",
                        help="also time each pruned model against the original (onnxruntime, batch 1, alternating "
                             "runs, spinning off) and list the speed-up")
    parser.add_argument("--exact-borders", action="store_true",
                        help="compensate removed channels exactly at the borders of padded convs (see prune)")
    parser.add_argument("--json", metavar="PATH", help="write the table as JSON to PATH ('-' for stdout)")
    parser.add_argument("--plot", metavar="PNG",
                        help="plot quality against MACs to this PNG (needs matplotlib: pip install 'onnx-bnslim[plot]')")
    return parser


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="onnx-bnslim", description=PRUNE_HELP.split(" `onnx-bnslim inspect")[0],
        epilog="`onnx-bnslim MODEL ...` is short for `onnx-bnslim prune MODEL ...`; "
               "`onnx-bnslim COMMAND --help` lists a command's options.")
    _global(parser, top=True)
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, build, text in (("prune", _prune_parser, PRUNE_HELP), ("inspect", _inspect_parser, INSPECT_HELP),
                              ("bench", _bench_parser, BENCH_HELP), ("sweep", _sweep_parser, SWEEP_HELP)):
        child = sub.add_parser(name, help=text.split(". ")[0].split(", then")[0], description=text,
                               prog=f"onnx-bnslim {name}")
        _global(child)
        build(child)
    return parser


def _with_command(argv: list[str]) -> list[str]:
    """``prune`` goes in front of the first word that is neither a global flag nor a command."""
    for i, word in enumerate(argv):
        if word in GLOBAL_FLAGS:
            continue
        if word in COMMANDS or word in ("-h", "--help", "--version"):
            return argv
        return [*argv[:i], "prune", *argv[i:]]
    return argv


class _Say:
    """Where the human-readable lines go: stdout; stderr when stdout carries the JSON; nowhere with -q."""

    def __init__(self, args: argparse.Namespace):
        self.quiet = getattr(args, "quiet", False)
        self.stream = sys.stderr if getattr(args, "json", None) == "-" else sys.stdout

    def __call__(self, text: str) -> None:
        if not self.quiet:
            print(text, file=self.stream)


def _json_target(args: argparse.Namespace) -> None:
    """Fail before any work when --json names a file that could not be written."""
    if args.json and args.json != "-":
        _check_folder(Path(args.json), "--json")


def _write_json(target: str | None, doc: dict) -> None:
    if target == "-":
        sys.stdout.write(dumps(doc) + "\n")
    elif target:
        write_text(Path(target), dumps(doc) + "\n", "--json")


def run_bench(args: argparse.Namespace) -> int:
    say = _Say(args)
    runtimes = args.runtimes or [r for r in RUNTIMES if r != "openvino" or openvino_available()]
    unknown = [r for r in runtimes if r not in RUNTIMES]
    if unknown:
        raise BnSlimError(f"--runtimes {unknown[0]}: unknown runtime; choose from {', '.join(RUNTIMES)}")
    if "openvino" in runtimes:
        require_openvino("bench --runtimes openvino")
    bad = [b for b in args.batch or () if b < 1]
    if bad:
        raise BnSlimError(f"--batch {bad[0]}: a batch size must be at least 1, e.g. --batch 1,32")
    if args.threads is not None and args.threads < 1:
        raise BnSlimError(f"--threads {args.threads} must be at least 1")
    _json_target(args)
    check_run_files([args.original, args.pruned], {"--json": args.json}, args.data)
    if args.quantize:
        return _run_bench_four_way(args, say, runtimes)
    result = benchmark(args.original, args.pruned, tuple(args.batch or (1, 32)), args.threads, args.runs, args.warmup,
                       tuple(runtimes), parse_input_shapes(_shape_specs(args.input_shapes)),
                       progress=not say.quiet,  # a bar on a terminal, a line per round elsewhere
                       data=args.data, preprocess=_preprocess(args))
    if not args.runtimes and "openvino" not in runtimes:
        result.notes.append(f"OpenVINO is not installed, so only onnxruntime was timed: {OPENVINO_HINT}")
    say(f"onnx-bnslim bench: {args.original} vs {args.pruned}, {result.threads} threads, "
        f"{result.runs} interleaved runs each; median (10th-90th percentile)")
    say(result.table(markdown=args.markdown))
    _write_json(args.json, envelope("bench", result.to_dict()))
    return 0


def _run_bench_four_way(args: argparse.Namespace, say: _Say, runtimes: list[str]) -> int:
    """bench --quantize int8: both FP32 models quantized on --data, then the four timed side by side."""
    shapes = parse_input_shapes(_shape_specs(args.input_shapes))
    with tempfile.TemporaryDirectory(prefix="onnx-bnslim-bench-") as tmp:
        # slim + INT8 first; INT8 alone then keeps the same nodes in FP32 (names survive pruning): a fair pair
        slim, described, kept = quantize_files({"slim_int8": args.pruned}, args.data, tmp, shapes, _preprocess(args),
                                               args.calibration_samples, args.int8_fp32)
        alone, _, _ = quantize_files({"int8": args.original}, args.data, tmp, shapes, _preprocess(args),
                                     args.calibration_samples, kept["slim_int8"])
        paths = {"fp32": args.original, "slim": args.pruned, **alone, **slim}
        result = benchmark_four_way(paths, tuple(args.batch or (1, 32)), args.threads, args.runs, args.warmup,
                                    tuple(runtimes), shapes, progress=not say.quiet)
    result.models.update({"int8": f"{args.original} quantized", "slim_int8": f"{args.pruned} quantized"})
    result.notes.insert(0, f"INT8 models quantized here on {described}"
                        + (f"; kept in FP32 in both: {', '.join(kept['slim_int8'])}" if kept["slim_int8"] else ""))
    say(f"onnx-bnslim bench: {args.original} vs {args.pruned}, FP32 and INT8, {result.threads} threads, "
        f"{result.runs} interleaved runs each; median ms (speed-up over FP32)")
    say(result.table(markdown=args.markdown))
    _write_json(args.json, envelope("bench", result.to_dict()))
    return 0


def _output_path(model: str, output: str | None, quantize: str | None = None) -> Path:
    """-o, or <model>.slim.onnx (<model>.slim.int8.onnx with --quantize int8) beside the input;
    checked against the input by check_run_files."""
    src = Path(model)
    return Path(output) if output else src.with_name(src.stem + (f".slim.{quantize}" if quantize else ".slim") + ".onnx")


def _check_folder(path: Path, flag: str) -> None:
    """Fail before any work when an output could not be written at the end (see model_io.target)."""
    if str(path) != STDOUT:
        target(path, flag)


def _options(args: argparse.Namespace, **extra) -> PruneOptions:
    return PruneOptions(min_channels=args.min_channels, round_to=args.round_to, keep=args.keep,
                        input_shapes=parse_input_shapes(_shape_specs(args.input_shapes)), **extra)


def run_prune(args: argparse.Namespace) -> int:
    say = _Say(args)
    if args.openvino:
        require_openvino("--openvino")
    if args.openvino_int8 != "auto" and not (args.openvino and args.quantize):
        raise BnSlimError(f"--openvino-int8 {args.openvino_int8} chooses how the INT8 OpenVINO IR is made: add "
                          "--openvino OUT_DIR and --quantize int8")
    if args.openvino_int8 == "nncf":
        require_nncf("--openvino-int8 nncf")
    out = _output_path(args.model, args.output, args.quantize)
    _json_target(args)
    if args.export_widths:
        _check_folder(Path(args.export_widths), "--export-widths")
    check_run_files([args.model], {"-o": out, "--json": args.json, "--export-widths": args.export_widths}, args.data,
                    (args.openvino, out.stem) if args.openvino else None)
    options = _options(args, ratio=args.ratio, threshold=args.threshold, data=args.data,
                       target_macs=args.target_macs, target_params=args.target_params,
                       target_latency=args.target_latency, runtime=args.runtime, latency_batch=args.latency_batch,
                       threads=args.threads, probe=args.probe,
                       importance=args.importance, max_layer_ratio=args.max_layer_ratio,
                       max_error=args.max_error, verify=not args.no_verify, exact_borders=args.exact_borders,
                       allow_growth=args.allow_growth,
                       compensation=args.compensation, preprocess=_preprocess(args), calibration_samples=args.calibration_samples,
                       check_samples=args.check_samples, max_rel_error=args.max_rel_error, min_cosine=args.min_cosine,
                       quantize=args.quantize, int8_fp32=args.int8_fp32)
    if args.fp16 and not args.openvino:
        raise BnSlimError("--fp16 applies to the OpenVINO IR: add --openvino OUT_DIR")
    if args.openvino and args.no_verify:
        raise BnSlimError("--openvino checks OpenVINO against onnxruntime on the check's inputs: drop --no-verify")
    try:
        result = prune(args.model, options)
    except CheckFailed as exc:  # no model is written, but the report says why
        _write_json(args.json, exc.report.to_dict())
        raise
    gc.collect()  # the original model is garbage now, held only by graph reference cycles: free it before saving
    if args.openvino:
        to_openvino(result, args.openvino, out.stem, fp16=args.fp16, int8_route=args.openvino_int8)
    result.report.output = str(out)
    clock = time.perf_counter()
    result.report.after.size_bytes = save_model(result.model, out, "-o")
    result.report.seconds["save"] = time.perf_counter() - clock
    say(f"onnx-bnslim {__version__}: {args.model} -> {out}")
    say(result.report.table(verbose=args.verbose))
    _write_json(args.json, result.report.to_dict())
    if args.export_widths:
        write_text(Path(args.export_widths), dumps(export_widths(result.report)) + "\n", "--export-widths")
    return 0


def _plot_and_json_first(args: argparse.Namespace) -> None:
    """Before any work: matplotlib for --plot, the --plot and --json targets, no file the run reads."""
    if args.plot:
        require_matplotlib("--plot")
        _check_folder(Path(args.plot), "--plot")
    _json_target(args)
    check_run_files([args.model], {"--json": args.json, "--plot": args.plot}, args.data)


def run_inspect(args: argparse.Namespace) -> int:
    say = _Say(args)
    _plot_and_json_first(args)
    options = _options(args, threshold=args.threshold, data=args.data, preprocess=_preprocess(args))
    result = inspect(args.model, ratio=args.ratio, options=options)
    say(inspect_table(result.spaces, result.ratio, args.threshold))
    for note in result.notes:
        say(f"Note: {note}")
    if args.hist:
        say("")
        say(ascii_histogram(result.spaces, args.threshold))
    if args.plot:
        plot_histogram(result.spaces, args.plot, args.threshold, title=Path(args.model).name)
        say(f"Wrote the score histogram to {args.plot}")
    _write_json(args.json, envelope("inspect", {
        "model": args.model, "options": {"ratio": args.ratio, "threshold": args.threshold, **_resolved(options)},
        "spaces": [asdict(s) for s in result.spaces], "coverage": coverage(result.spaces),
        "histogram": score_summary(result.spaces, args.threshold), "notes": result.notes}))
    return 0


def run_sweep(args: argparse.Namespace) -> int:
    say = _Say(args)
    _plot_and_json_first(args)
    options = _options(args, data=args.data, preprocess=_preprocess(args), exact_borders=args.exact_borders,
                       quantize=args.quantize, int8_fp32=args.int8_fp32)
    flag, budget = next(((f, b) for f, b in (("thresholds", "threshold"), ("target_macs", "target_macs"),
                                             ("target_params", "target_params")) if getattr(args, f)), ("ratios", "ratio"))
    result = sweep(args.model, options, budget, getattr(args, flag), latency=args.latency)
    say(f"onnx-bnslim sweep: {args.model}, {len(result.points)} budgets, pruned in memory (no model written)")
    say(result.table())
    if args.plot:
        plot_sweep(result, args.plot)
        say(f"Wrote the plot to {args.plot}")
    _write_json(args.json, envelope("sweep", {**result.to_dict(), "options": _resolved(options)}))
    return 0


def _resolved(options: PruneOptions) -> dict:
    """The options that shape every budget, as the command resolved them."""
    return {k: v for k, v in asdict(options).items() if k not in ("ratio", "threshold", "target_macs", "target_params")}


def _logging(verbose: bool, quiet: bool = False) -> None:
    level = logging.DEBUG if verbose else logging.ERROR if quiet else logging.WARNING
    logging.basicConfig(level=level, format="%(levelname)s %(name)s: %(message)s")


RUN = {"prune": run_prune, "inspect": run_inspect, "bench": run_bench, "sweep": run_sweep}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    try:
        args = _parser().parse_args(_with_command(argv))
        args.verbose, args.quiet = getattr(args, "verbose", False), getattr(args, "quiet", False)
        if args.verbose and args.quiet:
            raise BnSlimError("-v and -q contradict each other: give one")
        _logging(args.verbose, args.quiet)
        return RUN[args.command](args)
    except BnSlimError as exc:
        print(f"onnx-bnslim: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())

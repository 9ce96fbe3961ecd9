"""The `sae-scaling` command line. A user error, a broken or unreadable file prints one line and exits 2; a
bug prints one line saying so and exits 1. `--debug` shows the traceback instead."""
from __future__ import annotations

import argparse
import sys

from sae_core.errors import ConfigError, SAEScalingError


def _demo(args: argparse.Namespace) -> int:
    from sae_core.demo import run_demo

    out = run_demo(tokens=args.tokens, n_latents=args.n_latents, k=args.k, seed=args.seed)
    return 0 if out["mmcs"] >= args.min_mmcs else 1


def _run(args: argparse.Namespace) -> int:
    from orchestrator.plan import dry_run, plan_sweep
    from orchestrator.scheduler import run_sweep

    if args.dry_run:
        dry_run(plan_sweep(args.sweep, args.results))
        return 0
    return run_sweep(args.sweep, args.results, args.address, args.max_parallel)


def _submit(args: argparse.Namespace) -> int:
    from orchestrator.jobs import submit

    print(submit(args.sweep, args.address, args.results, args.python))
    return 0


def _logs(args: argparse.Namespace) -> int:
    from orchestrator.jobs import follow_logs

    return follow_logs(args.job_id, args.address)


def _status(args: argparse.Namespace) -> int:
    from orchestrator.status import sweep_status

    text, readable = sweep_status(args.sweep_dir)
    print(text)
    return 0 if readable else 2


def _results(args: argparse.Namespace) -> int:
    from orchestrator.status import results_table

    print(results_table(args.sweep_dir, args.query, args.columns, args.format, args.all))
    return 0


def _fit(args: argparse.Namespace) -> int:
    from analysis.sweep_fits import LAWS, fit_sweep, print_fits, write_fits

    laws = (args.law,) if args.law else LAWS
    if len(args.sweep_dir) > 1 and not args.out:
        raise ConfigError("fit: the fits of several sweeps together need --out (no sweep's folder holds them)")
    fits, skipped = fit_sweep(args.sweep_dir, laws, args.all)
    out = write_fits(args.sweep_dir[0] if len(args.sweep_dir) == 1 else args.sweep_dir, fits, skipped, laws,
                     out=args.out)
    print_fits(fits, skipped)
    print(f"written to {out}")
    return 0 if fits else 1


def _figures(args: argparse.Namespace) -> int:
    from analysis.report import write_report

    report = write_report(args.sweep_dir, args.out, args.all)
    print(f"report: {report}")
    return 0


def _predict(args: argparse.Namespace) -> int:
    from analysis.predict import format_predictions, predict

    print(format_predictions(predict(args.sweep_dir, args.n_latents, args.k, args.flops, args.all)))
    return 0


def _export(args: argparse.Namespace) -> int:
    from sae_core.formats import export

    print(export(args.run_dir, args.format, args.out))
    return 0


def _import(args: argparse.Namespace) -> int:
    from orchestrator.import_saes import import_saes

    import_saes(args.sweep, args.folders, args.results)
    return 0


def _schema(args: argparse.Namespace) -> int:
    from orchestrator.spec import json_schema

    print(json_schema())
    return 0


ALL_HELP = "also the runs of grid points since removed from the sweep (kept on disk, left out by default)"


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not 0 < value < float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a positive number, e.g. 1e18")
    return value


def _positive_int(text: str) -> int:
    value = _positive_float(text)  # 2e24 is a whole number too
    if not value.is_integer():
        raise argparse.ArgumentTypeError(f"{text!r}: allowed: a positive whole number, e.g. 16777216 or 1.6e7")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-scaling", description="Scaling-law experiments on sparse autoencoders.")
    parser.add_argument("--debug", action="store_true", help="show Python tracebacks instead of one-line errors")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a TopK SAE on synthetic activations with known features; report recovery")
    demo.add_argument("--tokens", type=int, default=5_000_000, help="training vectors (default 5M)")
    demo.add_argument("--n-latents", type=int, default=2048)
    demo.add_argument("--k", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--min-mmcs", type=float, default=0.9, help="exit 1 if final MMCS is below this")
    demo.set_defaults(func=_demo)

    run = sub.add_parser("run", help="validate, plan and run every grid point of a sweep not yet done")
    run.add_argument("sweep", help="sweep YAML")
    run.add_argument("--address", help="Ray cluster address (host:port or auto); default: an embedded local Ray")
    run.add_argument("--results", default="results", help="results root (default ./results)")
    run.add_argument("--dry-run", action="store_true", help="print the runs, tokens, estimated FLOPs and what is done")
    run.add_argument("--max-parallel", type=int, help="at most this many packs at once")
    run.set_defaults(func=_run)

    submit = sub.add_parser("submit", help="submit the sweep as a Ray Job to a remote cluster; prints the job id")
    submit.add_argument("sweep")
    submit.add_argument("--address", required=True, help="the cluster's dashboard, e.g. http://HEAD:8265")
    submit.add_argument("--results", required=True, help="results root on storage the cluster writes (absolute)")
    submit.add_argument("--python", default="python",
                        help="the cluster's Python that has the project's dependencies (default: python)")
    submit.set_defaults(func=_submit)

    logs = sub.add_parser("logs", help="follow a submitted sweep's log until it ends")
    logs.add_argument("job_id")
    logs.add_argument("--address", default="http://127.0.0.1:8265")
    logs.set_defaults(func=_logs)

    status = sub.add_parser("status", help="runs done / running / failed / pending, with failure reasons")
    status.add_argument("sweep_dir", help="results/<sweep name>")
    status.set_defaults(func=_status)

    results = sub.add_parser("results", help="the runs table, filtered with a pandas query")
    results.add_argument("sweep_dir")
    results.add_argument("--query", help="pandas query, e.g. \"arch == 'topk' and k == 32\"")
    results.add_argument("--columns", help="comma-separated columns")
    results.add_argument("--format", choices=["table", "csv", "json"], default="table")
    results.add_argument("--all", action="store_true", help=ALL_HELP)
    results.set_defaults(func=_results)

    fit = sub.add_parser("fit", help="fit the scaling laws the sweep supports, with confidence intervals")
    fit.add_argument("sweep_dir", nargs="+", help="results/<sweep name>; several: their runs fitted together "
                     "(with --out)")
    fit.add_argument("--law", choices=["lofn", "loc", "joint", "lr"], help="only this law (default: all supported)")
    fit.add_argument("--out", help="folder for fits.json and fits.parquet (default results/<sweep>/fits, where "
                                   "figures read them; give another on read-only storage)")
    fit.add_argument("--all", action="store_true", help=ALL_HELP)
    fit.set_defaults(func=_fit)

    figures = sub.add_parser("figures", help="every figure the sweep's data support (PNG, PDF) and an HTML report")
    figures.add_argument("sweep_dir", nargs="+", help="results/<sweep name>; several: their runs drawn together "
                         "(with --out), e.g. sweeps of different subject models")
    figures.add_argument("--out", help="folder for the figures (default results/<sweep>/figures; required with "
                         "several sweeps)")
    figures.add_argument("--all", action="store_true", help=ALL_HELP)
    figures.set_defaults(func=_figures)

    pred = sub.add_parser("predict", help="the fitted laws' predictions at a new size or compute, with 95%% intervals; "
                                          "the best lr at that size")
    pred.add_argument("sweep_dir", nargs="+", help="results/<sweep name> (several: their runs fitted together)")
    pred.add_argument("--n-latents", type=_positive_int, help="width: L(N), L(n, k) and the lr law")
    pred.add_argument("--k", type=_positive_int, help="k: L(n, k), and the L(N) of that k's series")
    pred.add_argument("--flops", type=_positive_float, help="SAE training compute: L(C)")
    pred.add_argument("--all", action="store_true", help=ALL_HELP)
    pred.set_defaults(func=_predict)

    export = sub.add_parser("export", help="write an SAE in a peer's on-disk format (SAELens, sparsify)")
    export.add_argument("run_dir", help="results/<sweep>/saes/<run_id> (or any folder SAE.save wrote)")
    export.add_argument("--format", required=True, help="saelens or sparsify")
    export.add_argument("out", help="output folder")
    export.set_defaults(func=_export)

    imp = sub.add_parser("import", help="evaluate SAEs trained elsewhere (SAELens, sparsify folders) on a sweep's "
                                        "data and add them to its results")
    imp.add_argument("sweep", help="sweep YAML whose data and evaluation settings to use")
    imp.add_argument("folders", nargs="+", help="SAE folders: SAELens v6, sparsify, or this toolkit's")
    imp.add_argument("--results", default="results", help="results root (default ./results)")
    imp.set_defaults(func=_import)

    schema = sub.add_parser("schema", help="print the JSON Schema of the sweep YAML (for editors)")
    schema.set_defaults(func=_schema)
    return parser


def _error(err: BaseException) -> tuple[str, int]:
    """The one line (and exit code) a failure shows without --debug."""
    if isinstance(err, SAEScalingError):
        return str(err), 2
    if isinstance(err, OSError) and err.filename is not None:  # storage: read-only, full, permissions, missing
        hint = ("; give --out a writable folder, or run where the results are writable"
                if err.errno in (13, 30) else "")  # EACCES, EROFS
        return f"{err.filename}: {err.strerror or err}{hint}", 2
    if isinstance(err, OSError):
        return f"{type(err).__name__}: {err}", 2
    return (f"internal error: {type(err).__name__}: {err} (a bug: please report it with the output of the same "
            "command run with --debug)"), 1


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except KeyboardInterrupt:
        print("sae-scaling: interrupted", file=sys.stderr)
        return 130
    except Exception as err:
        if args.debug:
            raise
        message, code = _error(err)
        print(f"sae-scaling: error: {message}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())

"""The `sae-scaling` command line. User errors print one message and exit 2; nothing else is printed."""
from __future__ import annotations

import argparse
import sys

from sae_core.errors import SAEScalingError


def _demo(args: argparse.Namespace) -> int:
    from sae_core.demo import run_demo

    out = run_demo(tokens=args.tokens, n_latents=args.n_latents, k=args.k, seed=args.seed)
    return 0 if out["mmcs"] >= args.min_mmcs else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sae-scaling", description="Scaling-law experiments on sparse autoencoders.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    demo = sub.add_parser("demo", help="train a TopK SAE on synthetic activations with known features; report recovery")
    demo.add_argument("--tokens", type=int, default=5_000_000, help="training vectors (default 5M)")
    demo.add_argument("--n-latents", type=int, default=2048)
    demo.add_argument("--k", type=int, default=8)
    demo.add_argument("--seed", type=int, default=0)
    demo.add_argument("--min-mmcs", type=float, default=0.9, help="exit 1 if final MMCS is below this")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except SAEScalingError as err:
        print(f"sae-scaling: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

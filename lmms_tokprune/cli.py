"""The `lmms-tokprune` command."""

from __future__ import annotations

import argparse
import json
import sys
from typing import List, Optional


def _demo(args: argparse.Namespace) -> int:
    from .demo import DEMO_METHODS, format_table, rows_as_json, run_demo

    methods = args.methods.split(",") if args.methods else list(DEMO_METHODS)
    rows = run_demo(args.pretrained, methods, args.budget, args.batch_size, args.limit)
    if args.json:
        print(json.dumps(rows_as_json(rows)))
    else:
        print(format_table(rows))
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="lmms-tokprune", description="Visual-token compression for LLaVA-1.5 in lmms-eval")
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="run the offline demo task with the uncompressed model and the baselines")
    demo.add_argument("--pretrained", default=None, help="checkpoint folder or hub id (default: the bundled tiny demo checkpoint)")
    demo.add_argument("--methods", default=None, help="comma-separated methods (default: none,random,topk_cls,spatial)")
    demo.add_argument("--budget", type=int, default=64, help="visual tokens per image for the compressed methods")
    demo.add_argument("--batch-size", type=int, default=4)
    demo.add_argument("--limit", type=int, default=None, help="evaluate only the first N documents")
    demo.add_argument("--json", action="store_true", help="print JSON instead of a table")
    demo.set_defaults(func=_demo)
    return parser


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ValueError as err:
        print(f"lmms-tokprune: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())

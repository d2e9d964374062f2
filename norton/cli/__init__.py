"""``norton`` command line: one module per stage parses its arguments and calls
the library; nothing more.  Every error a user can cause ends with one line on
stderr and exit status 2."""
from __future__ import annotations

import shlex
import sys
import warnings
from collections.abc import Sequence

from norton.cli import (
    compression,
    deployment,
    detection,
    evidence,
    inspection,
    training,
)
from norton.cli.common import Parser
from norton.core import tune_allocator
from norton.errors import NortonError

STAGES = (inspection, compression, training, deployment, detection, evidence)


def build_parser() -> Parser:
    parser = Parser(prog="norton", description="Compress CNNs with NORTON (CP decomposition + pruning).")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=Parser)
    for stage in STAGES:
        stage.register(sub)
    return parser


def _one_line_warning(message, category, filename, lineno, file=None, line=None) -> None:
    print(f"norton: warning: {message}", file=sys.stderr)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    args.command_line = shlex.join(["norton", *(sys.argv[1:] if argv is None else argv)])  # kept in records
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("default")
            warnings.showwarning = _one_line_warning
            tune_allocator()  # the process trains, plans or times models: freed memory kept for reuse
            return args.func(args)
    except NortonError as err:
        print(f"norton {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"norton {args.command}: interrupted", file=sys.stderr)
        return 130

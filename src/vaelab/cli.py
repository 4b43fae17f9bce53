"""The `vaelab` command line. Thin: each subcommand parses its flags and calls the library.

Errors meant for the user print one line and exit non-zero; ``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence


class UserError(Exception):
    """An error caused by the user's input: printed as one line, no traceback."""


def _cmd_check(args: argparse.Namespace) -> int:
    from vaelab.check import format_table, rows_as_dicts, run_check

    rows = run_check(seed=args.seed)
    print(format_table(rows))
    problems = [f"{r.model} / {r.proposal}: {p}" for r in rows for p in r.problems]
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"rows": rows_as_dicts(rows), "problems": problems}, f, indent=2)
    print()
    if problems:
        print(f"check FAILED: {len(problems)} disagreement(s) with the exact values:")
        for p in problems:
            print("  " + p)
        return 1
    print(
        "check passed: every estimate agrees with the exact value within its standard errors, "
        "or flags itself as unreliable."
    )
    return 0


def _add_check(sub) -> None:
    p = sub.add_parser(
        "check",
        help="check every estimator against exact values on linear-Gaussian models",
        description="Run the ELBO, IWAE and log p(x) estimators on linear-Gaussian models (exact log p(x) and "
        "posterior known) and print how each compares; exit status 0 only if all agree within standard errors.",
    )
    p.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    p.add_argument("--json", metavar="FILE", default=None, help="also write the table as JSON (default: no file)")
    p.set_defaults(func=_cmd_check)


# Registry of subcommands: name -> function adding its parser.
COMMANDS: dict[str, Callable] = {"check": _add_check}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vaelab", description="Deep latent-variable models trained by the ELBO.")
    parser.add_argument("--debug", action="store_true", help="show full tracebacks on errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add in COMMANDS.values():
        add(sub)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (UserError, ValueError, FileNotFoundError, PermissionError) as err:
        if args.debug:
            raise
        print(f"vaelab {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"vaelab {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

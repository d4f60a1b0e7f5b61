"""``ckpt-plugins``: list, inspect, verify, prune, diff and convert checkpoints from the shell.

Every command reads our format and the foreign ones (Lightning ``.ckpt``, HF ``checkpoint-N/``,
torch ``.pt``/``.bin``, ``.safetensors``). Listing and reading never take the directory's write
lock, so they are safe next to a running training job; ``prune --yes`` does take it.

Exit status: 0 success (``diff``: identical; ``verify``: all OK); 1 ``diff`` found differences or
``verify`` found a DAMAGED or UNSAFE checkpoint; 2 bad input or an unreadable checkpoint (the
message on stderr names it); 141 stdout was closed early (``| head``).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence

from ckpt_plugins.errors import CheckpointError

from . import convert, diff, export, inspect, ls, verify
from .storage import ENV_NAME, set_options

__all__ = ["build_parser", "main"]

EXIT_BROKEN_PIPE = 141  # 128 + SIGPIPE, what a shell reports for a writer cut off by `| head`


def build_parser() -> argparse.ArgumentParser:
    """The ``ckpt-plugins`` argument parser (each sub-command's ``func`` returns an exit status)."""
    parser = argparse.ArgumentParser(
        prog="ckpt-plugins",
        description=__doc__.splitlines()[0],
        epilog="Exit status: 0 ok; 1 differences (diff) or damage (verify); 2 bad input or an unreadable checkpoint.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="show the library's logs")
    storage_help = (
        "fsspec options for URL paths (s3://...), a JSON object: endpoint, credentials, ... "
        f"(default: ${ENV_NAME}, else the standard environment: AWS_ENDPOINT_URL, AWS_PROFILE, ...)"
    )
    parser.add_argument("--storage-options", metavar="JSON", help=storage_help)
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    ls.add_parsers(sub)
    inspect.add_parser(sub)
    verify.add_parser(sub)
    diff.add_parser(sub)
    convert.add_parser(sub)
    export.add_parser(sub)
    for command in sub.choices.values():  # also after the command: ckpt-plugins ls URL --storage-options ...
        command.add_argument("--storage-options", metavar="JSON", help=storage_help, default=argparse.SUPPRESS)
    return parser


def _quiet_stdout() -> None:
    """After a broken pipe: point stdout at /dev/null so the interpreter's final flush is silent."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
    except (OSError, ValueError, AttributeError):
        pass


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command; return its exit status (see the module docstring)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s"
    )
    try:
        set_options(args.storage_options)
        code = args.func(args)
        sys.stdout.flush()
        return code
    except BrokenPipeError:
        _quiet_stdout()
        return EXIT_BROKEN_PIPE
    except (CheckpointError, FileNotFoundError, ValueError) as exc:
        print(f"ckpt-plugins {args.command}: error: {exc}", file=sys.stderr)
        return 2

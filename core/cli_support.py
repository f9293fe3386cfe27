"""Shared command-line plumbing: user errors without tracebacks, logging, option parsing."""

from __future__ import annotations

import functools
import logging
import os
import sys

import click

from dfosd.core.errors import DfosdError


INTERRUPTED_EXIT = 130  # the shell's code for a command stopped by Ctrl-C (128 + SIGINT)


def user_errors(fn):
    """Turn a DfosdError into click's one-line error and a non-zero exit (no traceback), and
    Ctrl-C into exit 130 (click's default, "Aborted!" with exit 1, reads as a failure)."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except DfosdError as exc:
            raise click.ClickException(str(exc)) from None
        except KeyboardInterrupt:
            click.echo("interrupted (SIGINT)", err=True)
            raise SystemExit(INTERRUPTED_EXIT) from None

    return wrapper


def setup_logging(verbose: bool = False) -> None:
    logging.basicConfig(level=logging.DEBUG if verbose else logging.WARNING, format="%(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    # diffusers warns on every .to(float16) of a model built from a config; not actionable here, shown
    # with -v. Through its environment variable, read when diffusers is first imported: importing it
    # here would cost seconds of torch import before the cheap checks of a command.
    if not verbose:
        os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
        if "diffusers" in sys.modules:  # already imported (in-process callers): set it directly
            from diffusers.utils import logging as dlogging

            dlogging.set_verbosity_error()


def parse_int_list(value: str, option: str) -> tuple[int, ...]:
    try:
        items = tuple(int(v) for v in str(value).split(",") if v.strip())
    except ValueError:
        raise click.BadParameter(f"{value!r} is not a comma-separated list of integers", param_hint=option) from None
    if not items:
        raise click.BadParameter("give at least one value", param_hint=option)
    return items


def progress_bars(wanted: bool, stream=None) -> bool:
    """Whether to draw progress bars: asked for and ``stream`` (stderr) is a terminal. In a log
    file or a pipe a bar is carriage returns and escape codes, not information."""
    stream = sys.stderr if stream is None else stream
    return bool(wanted) and hasattr(stream, "isatty") and stream.isatty()


def say(msg: str) -> None:
    click.echo(msg, err=True)

"""The one exception type for user errors.

A DfosdError carries a message meant for a person (what went wrong, which file, how
to fix it). Command-line entry points print it without a traceback and exit non-zero;
anything else that escapes is a bug and keeps its traceback.
"""

from __future__ import annotations


class DfosdError(Exception):
    """A problem the user can fix: bad input, a missing file, an unsupported option."""

    exit_code = 2

    def __init__(self, message: str, *, hint: str | None = None):
        self.message = message
        self.hint = hint
        super().__init__(message if hint is None else f"{message}\n  fix: {hint}")


class ImageInputError(DfosdError):
    """One input image that cannot be used (missing, empty, not an image, truncated, rejected by a
    server, ...): batch commands report it for that image and go on with the others."""


def problems_error(what: str, problems: list[str], *, hint: str | None = None) -> DfosdError:
    """One error that lists every problem found, instead of stopping at the first."""
    lines = "\n".join(f"  - {p}" for p in problems)
    return DfosdError(f"{what}: {len(problems)} problem(s)\n{lines}", hint=hint)

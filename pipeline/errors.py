"""User-facing failures: the error root, the usage error behind exit 2, the exit codes, and the
one-line text every failure takes (errors/, exit messages, API responses)."""

from __future__ import annotations

from models.interface import UserError

__all__ = ["EXIT_INTERRUPTED", "EXIT_OK", "EXIT_ROWS_FAILED", "EXIT_USAGE", "UsageError", "UserError", "one_line"]

#: `reel render` and the batch jobs: every row rendered or skipped / the manifest or options are
#: unusable (nothing written) / some rows failed (listed in errors/).
EXIT_OK, EXIT_USAGE, EXIT_ROWS_FAILED = 0, 2, 3
#: Stopped by Ctrl-C (SIGINT): 128 + 2, what shells and CI runners read as "interrupted" (2 would
#: say "bad input", and a rerun of the same command resumes where it stopped).
EXIT_INTERRUPTED = 130


class UsageError(UserError):
    """The run cannot start (bad manifest, model or output): exit 2, nothing written."""

    show_type = True


def one_line(e: BaseException, limit: int | None = 500, *, show_type: bool | None = None) -> str:
    """The exception as one line (its type's name when it has no message). The type is named
    before the message when `show_type` says so; by default unless it is a plain ValueError or a
    `UserError` whose class leaves `show_type` off."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    if show_type is None:
        show_type = getattr(type(e), "show_type", type(e) is not ValueError)
    if show_type:
        text = f"{type(e).__name__}: {text}"
    return text if limit is None else text[:limit]

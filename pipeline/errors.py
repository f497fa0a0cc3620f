"""One-line error text, the form every user-facing failure takes (errors/, exit messages, API)."""


class UserError(ValueError):
    """An error whose message is written for the user as it stands (its type is not named)."""


def one_line(e: BaseException, limit: int = 500) -> str:
    """The exception as one line; the type is named unless it is a plain ValueError or a UserError."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    if type(e) is not ValueError and not isinstance(e, UserError):
        text = f"{type(e).__name__}: {text}"
    return text[:limit]

"""One-line error text, the form every user-facing failure takes (errors/, exit messages, API)."""


def one_line(e: BaseException, limit: int = 500) -> str:
    """The exception as one line; the type is named unless it is a plain ValueError message."""
    text = " ".join(str(e).split())
    if not text:
        return type(e).__name__
    if type(e) is not ValueError:
        text = f"{type(e).__name__}: {text}"
    return text[:limit]

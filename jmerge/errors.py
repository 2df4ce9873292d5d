"""User-facing errors: the CLI prints their message on one line and exits with code 2."""


class JmergeError(Exception):
    """Bad input or an unmet precondition the user can fix. Never a bug in jmerge."""

    exit_code = 2


def collect(problems: list[str], what: str) -> None:
    """Raise one JmergeError listing every problem, so a user fixes them all in one pass."""
    if problems:
        shown = "; ".join(problems[:8])
        more = f" (and {len(problems) - 8} more)" if len(problems) > 8 else ""
        raise JmergeError(f"{what}: {shown}{more}")


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of another library's error message (its type's name if it has none), for
    the one line that names the file it was reading."""
    return (str(e).strip().splitlines() or [type(e).__name__])[0][:limit]

"""User-facing errors. The CLI prints these as one line on stderr and exits with code 2."""


class KilnError(Exception):
    """A mistake the user can fix (bad config, missing data, corrupt checkpoint). One line, no traceback."""


class ConfigError(KilnError):
    """Unknown key, wrong type or impossible combination in a config file or override."""


class DataError(KilnError):
    """Missing, empty or unreadable data, or a tokenizer that does not fit the model."""


class CheckpointError(KilnError):
    """A checkpoint that is missing, corrupt, or from another architecture."""


def first_line(e: BaseException, limit: int = 200) -> str:
    """The first line of `str(e)` (at most `limit` characters), or the exception's type name when it
    has no message: a foreign exception folded into a one-line KilnError."""
    text = str(e).strip()
    return text.splitlines()[0][:limit] if text else type(e).__name__

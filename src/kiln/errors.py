"""User-facing errors. The CLI prints these as one line on stderr and exits with code 2."""


class KilnError(Exception):
    """A mistake the user can fix (bad config, missing data, corrupt checkpoint). One line, no traceback."""


class ConfigError(KilnError):
    """Unknown key, wrong type or impossible combination in a config file or override."""


class DataError(KilnError):
    """Missing, empty or unreadable data, or a tokenizer that does not fit the model."""


class CheckpointError(KilnError):
    """A checkpoint that is missing, corrupt, or from another architecture."""

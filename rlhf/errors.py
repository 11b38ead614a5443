"""Errors that a user can act on. The CLI prints their message alone, without a traceback."""


class RLHFError(Exception):
    """Base class: the message says what is wrong and, where known, which file, line and field."""


class ConfigError(RLHFError):
    """A configuration file or option is wrong."""


class DataError(RLHFError):
    """An input data file breaks its contract. The message names file, line and field."""

    def __init__(self, path, line: int | None, message: str, field: str | None = None):
        where = str(path)
        if line is not None:
            where += f":{line}"
        if field is not None:
            where += f": field {field!r}"
        super().__init__(f"{where}: {message}")
        self.path, self.line, self.field = path, line, field


class TrainingError(RLHFError):
    """A run had to stop (non-finite loss, bad scorer output); the last good checkpoint is kept."""

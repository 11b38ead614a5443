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


def brief(value: object, limit: int = 80) -> str:
    """``repr(value)`` bounded in length and depth, for messages that quote user input (a 6 MB or
    1,000-levels-deep value must not come back whole, nor overflow the stack)."""
    import reprlib

    r = reprlib.Repr()
    r.maxlevel, r.maxlist, r.maxdict, r.maxstring, r.maxother, r.maxlong = 3, 8, 8, limit, limit, 40
    try:
        text = r.repr(value)
    except ValueError:  # an integer too long to print (Python refuses past 4,300 digits)
        text = f"<{type(value).__name__} too long to show>"
    return text if len(text) <= limit else text[:limit - 3] + "..."

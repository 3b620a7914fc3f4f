"""User-facing errors: one line that names the input and the problem."""


class ApproxrunError(Exception):
    """A mistake in user input (file, config key, value); the CLI prints it as one line."""


class ConfigError(ApproxrunError):
    """A config key or value that does not fit the schema: a usage error (the command exits with 2)."""


def one_line(exc: BaseException | str) -> str:
    """An exception (or message) as one line: the first non-empty line along its cause chain,
    prefixed by the exception's type unless it is an :class:`ApproxrunError` or a plain message."""
    current = exc
    while current is not None:
        text = current if isinstance(current, str) else str(current)
        line = next((line.strip() for line in text.splitlines() if line.strip()), "")
        if line:
            break
        current = None if isinstance(current, str) else (current.__cause__ or current.__context__)
    else:
        line = ""
    if isinstance(exc, (str, ApproxrunError)):
        return line
    return f"{type(exc).__name__}: {line}" if line else type(exc).__name__

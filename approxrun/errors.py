"""User-facing errors: one line that names the input and the problem."""


class ApproxrunError(Exception):
    """A mistake in user input (file, config key, value); the CLI prints it as one line."""

"""The one error type users see: the CLI prints its message on one line and exits with code 2."""


class PipeError(Exception):
    """Bad input or state that the user can fix (a path, a name, an option, a store)."""

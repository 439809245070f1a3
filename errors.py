"""The one error type a user sees. The CLI prints its message on one line and exits with code 2."""


class OnnxlmError(Exception):
    """A problem with the user's input or environment, with a message the user can act on."""


def first_line(exc: BaseException) -> str:
    """A library exception's message cut to its first non-empty line (its type name if it has none), for an
    OnnxlmError that wraps it: third-party messages often run to many lines, and some are empty."""
    lines = str(exc).strip().splitlines()
    return lines[0] if lines else type(exc).__name__

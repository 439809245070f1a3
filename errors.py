"""The one error type a user sees. The CLI prints its message on one line and exits with code 2."""


class OnnxlmError(Exception):
    """A problem with the user's input or environment, with a message the user can act on."""

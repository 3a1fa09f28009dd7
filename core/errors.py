"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class PcmeError(Exception):
    """Known bad input or state. The message is user-facing: it names the file or argument
    and says what is wrong, in one line."""

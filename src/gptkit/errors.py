"""The one exception type for user mistakes.

Library code raises `GptkitError` for anything a user can fix (a missing file, a bad
value, a checkpoint from another tokenizer); the CLI prints its message as one line on
stderr and exits non-zero. Bugs stay ordinary exceptions with tracebacks.
"""


class GptkitError(Exception):
    """A user-facing error: its message is one complete sentence about what to fix."""

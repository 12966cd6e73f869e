"""The one exception type for mistakes a user can make (bad flags, files, configurations).

The CLI prints its message as one paragraph and exits with status 2; anything else is a bug and
keeps its traceback.
"""


class DitplanError(Exception):
    """A user-facing error: the message names the bad value and the rule it breaks."""

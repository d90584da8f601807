"""The one error type for bad input.

A wrong option, a missing or damaged file, a frame count that is not 1 + 4k: the user can fix these, so the
command-line tools print them as one line and exit with status 2. Every other exception, a ValueError from a
bug included, is a real failure and keeps its traceback.
"""


class InputError(ValueError):
    """Bad input from the user: an option, a path, or a file's contents. The message says what was wrong and
    what to do."""


class MissingInputError(InputError, FileNotFoundError):
    """A file or folder the user named is not there."""


class Interrupted(KeyboardInterrupt):
    """Ctrl-C, once the command has kept what it could; the message says what was kept and how to go on."""

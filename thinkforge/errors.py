"""The one exception type for user mistakes.

The CLI turns a UserError into one line on stderr and exit code 2; anything else is a bug and may show a
traceback. Messages say what is wrong, where, and what to do.
"""


class UserError(Exception):
    """A mistake the user can fix: bad input, a missing file, a config typo."""

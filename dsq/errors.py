"""The one exception type for mistakes a user can fix (bad file, bad option, bad folder)."""


class DsqError(ValueError):
    """A user error: its message is one line saying what is wrong and what to do."""

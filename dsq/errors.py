"""The one exception type for mistakes a user can fix (bad file, bad option, bad folder), and
the warning category for what a user should see but need not stop for."""


class DsqError(ValueError):
    """A user error: its message is one line saying what is wrong and what to do."""


class DsqWarning(UserWarning):
    """Something a user likely did not mean (a glob that matches no layer, a converted model): one line."""


def os_reason(error: OSError) -> str:
    """Why a file operation failed, in the operating system's words ("No space left on device")."""
    return error.strerror or str(error)

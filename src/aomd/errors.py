"""Errors that mean the user asked for something impossible; the entrypoints print them as one line."""
import errno


class UserError(Exception):
    """Bad input: configuration, checkpoint, dataset or environment. The message says what was
    wrong and what to do, in one sentence."""


class ConfigError(UserError, ValueError):
    """The configuration has a wrong type or an impossible value."""


def cannot_write(error: OSError) -> bool:
    """Whether `error` says this user may not write there (permissions, a read-only mount)."""
    return error.errno in (errno.EACCES, errno.EPERM, errno.EROFS)

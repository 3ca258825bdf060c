"""Errors shared by the library and the command line."""


class UserError(ValueError):
    """Bad input from the user. The CLI prints it without a traceback and exits with status 2."""

"""The one exception type the CLI turns into a one-line message and a non-zero exit."""


class UserError(Exception):
    """Bad input from the user: reported as one line, exit code 2, nothing overwritten."""

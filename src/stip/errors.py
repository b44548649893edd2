"""`StipError`: the one base of every error stip raises on purpose.

Each subclass also keeps the built-in base its callers expect (`InvalidKey` is a ValueError,
`TrustError` a ConnectionError, …), so ``except ValueError`` still works. A StipError's message
is written for the person at the keyboard and never holds a secret; the CLI prints it and exits
1, with no traceback. Anything else that escapes a command is a bug, shown as one.

This module imports nothing: every floor, `models/` included, may raise from it.
"""


class StipError(Exception):
    """An error stip raises on purpose, with a message meant for its user."""

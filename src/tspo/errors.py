"""User-facing errors.

Anything a user can cause (a bad file, a bad flag, a dead retriever) raises :class:`TSPOError`
with a one-line message. The CLI prints it as ``error: <message>`` and exits with status 2,
never a traceback.
"""


class TSPOError(Exception):
    """An error caused by user input or the environment, reported as one line."""

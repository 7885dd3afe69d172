"""Errors that mean "the input is wrong", as opposed to bugs.

The CLI prints their message (which names the bad field, file or value) without a
traceback and exits with code 2; no stage is marked done.
"""


class BayeskdError(Exception):
    """A problem with the user's input or environment that the message explains."""

    exit_code = 2

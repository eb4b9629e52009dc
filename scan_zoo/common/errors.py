"""The one exception type the scripts turn into a single clear error line."""


class UserError(Exception):
    """A problem with the user's input (options, files, data), not a bug.

    Scripts catch it and print ``<prog>: error: <message>`` with exit status 2, without a traceback.
    """

"""The package's one error class."""


class MiraiError(ValueError):
    """Raised for any misuse of mirai_plugin; the message says what broke and how to fix it.

    It subclasses ``ValueError`` so callers that already guard configuration errors
    with ``except ValueError`` keep working.
    """

"""Temporary attribute replacement shared by the trainer harnesses."""

import contextlib


@contextlib.contextmanager
def patched(obj, name: str, value):
    """Set ``obj.name`` (a module, class or object) for the duration; restore it, or remove it if it
    was inherited or absent, on exit."""
    missing = object()
    old = vars(obj).get(name, missing)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if old is missing:
            delattr(obj, name)
        else:
            setattr(obj, name, old)

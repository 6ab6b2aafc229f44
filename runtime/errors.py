"""Errors the runtime reports to the user as one line (bad model file, bad image, bad request)."""


class ModelError(Exception):
    """A model file that cannot be used (wrong architecture, missing tensors, mismatched pair)."""


class InputError(Exception):
    """Input the user gave that cannot be processed (an unreadable image, a bad page range, ...)."""

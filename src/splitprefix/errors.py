"""Typed errors for input that comes from a user, a file or the network.

Each error says what was expected and what was found, so the message alone tells the user what to fix.
"""


class SplitPrefixError(Exception):
    """Base class of every error this package raises on bad input."""


class ConfigError(SplitPrefixError, ValueError):
    """A setting is out of range or conflicts with another setting."""


class UnsupportedArchitectureError(SplitPrefixError, ValueError):
    """The model's architecture has no entry in the registry."""


class ShapeMismatchError(SplitPrefixError, ValueError):
    """A tensor or a prefix does not have the shape the model needs."""


class DataFormatError(SplitPrefixError, ValueError):
    """A data file or record is malformed."""

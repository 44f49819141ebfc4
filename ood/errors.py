"""Errors that are the user's to fix: the entry points print their message, never a traceback."""


class OODError(Exception):
    """Base class for every error ood raises on purpose."""


class ConfigError(OODError):
    """A configuration value is unknown or inconsistent; the message lists the valid choices."""


class DataNotFoundError(OODError):
    """A dataset is missing on disk; the message says where it was looked for and how to get it."""


class CheckpointError(OODError):
    """A checkpoint is missing, unreadable or does not fit the configured model; names the file."""


class NonFiniteError(OODError):
    """A loss or score became NaN or infinite; names the step, detector or dataset."""

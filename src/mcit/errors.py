"""User-facing errors: the CLI prints their message on one line and exits non-zero."""


class McitError(Exception):
    """A problem with the user's input (config, data, option) that a message can explain."""


class ConfigError(McitError):
    """An invalid configuration key or value."""


class DataError(McitError):
    """A malformed dataset file, record or missing image."""

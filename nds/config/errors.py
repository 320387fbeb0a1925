"""The one error a config raises."""


class ConfigError(ValueError):
    """A config that cannot run; the message names the offending key or path."""

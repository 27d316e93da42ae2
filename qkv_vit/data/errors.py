"""The one error type for a data configuration that cannot work."""

from qkv_vit.errors import ConfigError


class DataConfigError(ConfigError):
    """Bad data configuration or missing data, raised with one clear message before heavy work."""

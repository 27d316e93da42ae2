"""The one error type for a data configuration that cannot work."""


class DataConfigError(ValueError):
    """Bad data configuration or missing data, raised with one clear message before heavy work."""

"""The one error type for a data configuration that cannot work."""

from qkv_vit.errors import ConfigError


class DataConfigError(ConfigError):
    """Bad data configuration or missing data, raised with one clear message before heavy work."""


def batch_too_large(batch: str, examples: int, where: str, largest: int) -> DataConfigError:
    """The error for a batch larger than the train split, with the fix: a global batch that fits."""
    return DataConfigError(
        f"{batch} is larger than the {examples} train examples {where}: give a global batch of at most {largest} "
        f"(--config.global_batch_size={largest}, or batch={largest} after the colon of a config file that takes it, "
        "as configs/cifar10.py does)."
    )

"""How a global batch splits over processes and devices (no TensorFlow: every source uses it)."""

from __future__ import annotations

from qkv_vit.data.errors import DataConfigError


def local_batch_size(global_batch_size: int, process_count: int, local_device_count: int | None = None) -> int:
    """The per-process batch; raises DataConfigError unless it splits evenly over processes and devices."""
    if global_batch_size < 1 or global_batch_size % process_count:
        raise DataConfigError(
            f"Global batch size {global_batch_size} is not divisible by the process count {process_count}: set "
            f"the global batch (config.global_batch_size) to a multiple of {process_count}."
        )
    local_batch = global_batch_size // process_count
    if local_device_count is None:
        import jax  # only for the default: the data code itself never touches the accelerator

        local_device_count = jax.local_device_count()
    if local_batch % local_device_count:
        raise DataConfigError(
            f"Per-process batch size {local_batch} (global {global_batch_size} / {process_count} processes) "
            f"is not divisible by the {local_device_count} local devices: set the global batch "
            f"(config.global_batch_size) to a multiple of {process_count * local_device_count}."
        )
    return local_batch


def processes(process_index: int | None, process_count: int | None) -> tuple[int, int]:
    """(process index, process count): the given ones, else JAX's; DataConfigError for an index out of range."""
    if process_index is None or process_count is None:
        import jax

        process_index = jax.process_index() if process_index is None else process_index
        process_count = jax.process_count() if process_count is None else process_count
    if not 0 <= process_index < process_count:
        raise DataConfigError(
            f"process_index {process_index} is not in [0, process_count={process_count}): give each process its "
            f"own index from 0 to {process_count - 1} (--process_id)."
        )
    return process_index, process_count


def check_stream_position(seed: int, start_step: int) -> None:
    """DataConfigError unless a train stream's seed and first step are >= 0."""
    if seed < 0 or start_step < 0:
        raise DataConfigError(
            f"seed and start_step must be >= 0, not {seed} and {start_step}: set config.seed to 0 or more."
        )

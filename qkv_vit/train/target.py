"""The devices a program is built for: this machine's (`Target.present()`), or a TPU slice described by a topology
that need not exist here (`Target.topology("v5e:16x16")`, compile-only, with libtpu installed).

Every choice a run's program makes by platform (which layers compute the model, how the batch is finished) is
read from its Target, never from `jax.default_backend()` while tracing: a program for a TPU slice built on a
CPU host is the TPU program, not the CPU one.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
from jax.experimental import topologies

from qkv_vit.errors import ConfigError

MEGACORE_VERSIONS = ("v4", "v5p")  # TPU versions whose VMs run a chip's two TensorCores as one device


@dataclasses.dataclass(frozen=True)
class Target:
    """An ordered list of devices, all of one platform, spread evenly over `process_count` processes."""

    devices: tuple[Any, ...]  # jax Devices: of this machine's backend, or of a compile-only topology
    name: str  # "present" or the topology's name, e.g. "v5e:16x16"

    def __post_init__(self) -> None:
        kinds = {device.platform for device in self.devices}
        if len(kinds) != 1:
            raise ValueError(f"A target's devices are of one platform, got {sorted(kinds)}.")
        per_process: dict[int, int] = {}
        for device in self.devices:
            per_process[device.process_index] = per_process.get(device.process_index, 0) + 1
        if len(set(per_process.values())) != 1:
            raise ValueError(f"A target's processes hold the same number of devices, got {per_process}.")

    @classmethod
    def present(cls) -> Target:
        """Every device of the running JAX backend (all processes' after jax.distributed.initialize)."""
        return cls(tuple(jax.devices()), "present")

    @classmethod
    def topology(cls, name: str, chip_config_name: str | None = None) -> Target:
        """The devices of a TPU topology (e.g. "v5e:2x2", "v4:2x2x4" with chip_config_name="megacore"), for
        compiling only; ConfigError naming the fix if libtpu is missing or the name is not a topology."""
        if name.split(":")[0] in MEGACORE_VERSIONS and chip_config_name is None:
            raise ConfigError(
                f"TPU topology {name!r} runs each chip's two TensorCores as one device on its VMs, and the plan's "
                "figures are per chip: add --chip-config megacore."
            )
        options = {} if chip_config_name is None else {"chip_config_name": chip_config_name}
        try:
            description = topologies.get_topology_desc(topology_name=name, platform="tpu", **options)
        except Exception as error:  # libtpu raises XlaRuntimeError / RuntimeError with its own words
            raise ConfigError(
                f"Cannot describe TPU topology {name!r}"
                + (f" with chip config {chip_config_name!r}" if chip_config_name else "")
                + f": {str(error).splitlines()[0] if str(error) else type(error).__name__}. Names look like "
                "v5e:2x2, v5e:16x16, v6e:4x4, v4:2x2x4 or v5p:2x2x4 (v4 and v5p with --chip-config megacore); "
                "compiling for a TPU needs libtpu: pip install -e '.[tpu]'."
            ) from error
        return cls(tuple(description.devices), name)

    @property
    def platform(self) -> str:
        return self.devices[0].platform

    @property
    def device_kind(self) -> str:
        """e.g. "TPU v5 lite", "NVIDIA H100 80GB HBM3", "cpu"."""
        return self.devices[0].device_kind

    @property
    def device_count(self) -> int:
        return len(self.devices)

    @property
    def process_count(self) -> int:
        return len({device.process_index for device in self.devices})

    @property
    def local_device_count(self) -> int:
        """Devices per process."""
        return self.device_count // self.process_count

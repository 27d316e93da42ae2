"""What a TPU chip offers, for turning a compiled program's per-chip figures into time and money.

Published per-chip figures (cloud.google.com/tpu/docs/system-architecture-tpu-vm and the per-version pages, read
2026-12): HBM capacity and bandwidth, bfloat16 peak. The clock is that peak over the MXUs' multiply-adds per cycle
(v4: 8 MXUs of 128x128 at 1.05 GHz gives its 275 TFLOP/s), for converting the compiler's per-kernel cycle
estimates into seconds. Prices are on-demand list prices per chip-hour in us-central regions (cloud.google.com/tpu/
pricing, read 2026-12); pass --price-per-chip-hour for yours (committed use and spot cost less).
"""

from __future__ import annotations

import dataclasses

GiB = 2**30


@dataclasses.dataclass(frozen=True)
class Chip:
    name: str  # as TPU VMs name the version: v5e, v4, ...
    hbm_bytes: int
    hbm_bytes_per_s: float
    peak_bf16_flops: float  # per second
    clock_hz: float
    price_per_chip_hour: float  # USD, on-demand list price


# By jax's device_kind.
CHIPS = {
    "TPU v5 lite": Chip("v5e", 16 * GiB, 819e9, 197e12, 1.5e9, 1.20),
    "TPU v6 lite": Chip("v6e", 32 * GiB, 1640e9, 918e12, 1.75e9, 2.70),
    "TPU v4": Chip("v4", 32 * GiB, 1228e9, 275e12, 1.05e9, 3.22),
    "TPU v5": Chip("v5p", 95 * GiB, 2765e9, 459e12, 1.75e9, 4.20),
}


def chip_of(device_kind: str) -> Chip | None:
    return CHIPS.get(device_kind)

"""Not a measurement: what N runs at once could give on one GPU, from the compiled program (no GPU needed).

    JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu python benchmarks/parallel_estimate.py --gpu h100
    python benchmarks/parallel_estimate.py            # this machine's backend instead (the CPU here)

Compiles the trainer's train step of the QKV comparison (configs/cifar10.py:recipe=short,source=in_memory,
depth=4 with --qkv: XCiT-N12/8, 32x32, batch 128) for one GPU described by its public specifications (an XLA
GPU target config; needs `pip install "jax-cuda12-plugin[with-cuda]"`, and the two variables above so that the
plugin loads without a driver), and reads off it: the kernels a step launches (fusions, library calls and
copies of the entry computation), the device memory a process needs (XLA's memory analysis plus the device-
resident train split), the model FLOPs per step. The estimate: a step of K kernels keeps the GPU busy for
K x t, t being a small kernel's launch plus minimum run time (--kernel-us, a range, not measured here), so one
process trains at most batch / (K t) images/s whatever its FLOPs. N processes without NVIDIA MPS time-share the
GPU: the same ceiling, the gain being each one's host time, compilation and data loading overlapping the
others'. With MPS (`nvidia-cuda-mps-control -d`) their small kernels run side by side: up to N times that
until the SMs fill.
"""

import argparse
import collections
import re
import sys
import time
from typing import Any

import harness

sys.path.insert(0, str(harness.REPO))

# Public specifications (NVIDIA datasheets) in the fields XLA's GPU target config needs to compile for a GPU.
GPUS = {
    "h100": dict(name="NVIDIA H100 80GB HBM3", memory=84_942_979_072, bandwidth=3_352_320_000_000, sms=132),
    "h200": dict(name="NVIDIA H200", memory=150_754_820_096, bandwidth=4_800_000_000_000, sms=132),
}
KERNEL_OPS = ("fusion", "custom-call", "copy", "sort", "scatter", "gather", "convolution", "dot")
TRAIN_FLOPS_PER_MAC = 6


def target_config(gpu: dict[str, Any]) -> str:
    """An XLA GpuTargetConfigProto (text) for a Hopper GPU: only the fields the compiler reads."""
    return f"""gpu_device_info {{
  threads_per_block_limit: 1024 threads_per_warp: 32 shared_memory_per_block: 49152
  shared_memory_per_core: 233472 threads_per_core_limit: 2048 core_count: {gpu["sms"]} fpus_per_core: 128
  block_dim_limit_x: 2147483647 block_dim_limit_y: 65535 block_dim_limit_z: 65535
  memory_bandwidth: {gpu["bandwidth"]} l2_cache_size: 52428800 clock_rate_ghz: 1.98
  device_memory_size: {gpu["memory"]} shared_memory_per_block_optin: 232448
  cuda_compute_capability {{ major: 9 }} registers_per_core_limit: 65536 registers_per_block_limit: 65536
}}
platform_name: "CUDA"
dnn_version_info {{ major: 8 minor: 9 patch: 4 }}
device_description_str: "{gpu["name"]}"
"""


def make_target(gpu_name: str | None):
    from jax.experimental import topologies

    from qkv_vit.train.target import Target

    if not gpu_name:
        return Target.present()
    try:
        description = topologies.get_topology_desc(
            "1x1x1", platform="cuda", topology="1x1x1", target_config=target_config(GPUS[gpu_name])
        )
    except Exception as error:  # noqa: BLE001 - the plugin's own words, then how to get it
        raise SystemExit(
            f"error: cannot compile for a GPU here ({str(error).splitlines()[0]}): pip install "
            '"jax-cuda12-plugin[with-cuda]" and run with JAX_SKIP_CUDA_CONSTRAINTS_CHECK=1 JAX_PLATFORMS=cpu'
        ) from error
    return Target(tuple(description.devices), gpu_name)


def entry_kernels(text: str) -> collections.Counter:
    """Instructions of the compiled program's entry computation that launch work on the device, by op."""
    entry = text[text.index("\nENTRY") :]
    entry = entry[: entry.index("\n}\n")]
    found = collections.Counter()
    for line in entry.splitlines()[1:]:
        match = re.search(r"= (?:\([^=]*\)|\S+) ([a-z-]+)\(", line)
        if match and match.group(1) in KERNEL_OPS:
            found[match.group(1)] += 1
    return found


def estimate(args: argparse.Namespace) -> dict[str, Any]:
    from qkv_vit.models.flops import count_macs
    from qkv_vit.plan import planning
    from qkv_vit.sweep import load_config_module
    from qkv_vit.train import program

    target = make_target(args.gpu)
    arg = f"qkv={args.qkv},recipe=short,source=in_memory,depth={args.depth},epochs=10"
    config = load_config_module(harness.REPO / "configs" / "cifar10.py").get_config(arg)
    # What the trainer would read from CIFAR-10 (its classes, its length: 390 steps an epoch), given: no data read.
    config.data.num_classes, config.total_steps, config.optimizer.warmup_steps = 10, 3900, 390
    started = time.perf_counter()
    run = planning.planned_run(config, target)
    compiled = program.lower_train_step(run).compile()
    compile_s = time.perf_counter() - started
    memory = compiled.memory_analysis()
    step_bytes = memory.argument_size_in_bytes + memory.output_size_in_bytes + memory.temp_size_in_bytes
    step_bytes -= memory.alias_size_in_bytes
    kernels = entry_kernels(compiled.as_text())
    split_bytes = args.train_images * 32 * 32 * 3  # the in-memory train split, uint8, on the device
    count = sum(kernels.values())
    low_us, high_us = args.kernel_us
    batch = config.global_batch_size
    return {
        "benchmark": "parallel_estimate",
        "device_kind": target.device_kind,
        "qkv": args.qkv,
        "depth": args.depth,
        "batch_size": batch,
        "kernels_per_step": count,
        "kernels_by_op": dict(kernels),
        "step_memory_bytes": int(step_bytes),
        "process_memory_bytes": int(step_bytes + split_bytes),
        "model_flops_per_step": TRAIN_FLOPS_PER_MAC * count_macs(run.model, 32) * batch,
        "compile_s": compile_s,
        "kernel_us": [low_us, high_us],
        "one_process_images_per_sec": [batch / (count * high_us * 1e-6), batch / (count * low_us * 1e-6)],
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--gpu", choices=sorted(GPUS), help="compile for this GPU (default: this machine's devices)")
    parser.add_argument("--qkv", default="linear")
    parser.add_argument("--depth", type=int, default=4)
    parser.add_argument("--train-images", type=int, default=50_000)
    parser.add_argument("--kernel-us", type=float, nargs=2, default=(2.0, 5.0), help="a small kernel's device time")
    args = parser.parse_args(argv)
    result = estimate(args)
    low, high = result["one_process_images_per_sec"]
    print(f"{result['device_kind']}: qkv {args.qkv}, depth {args.depth}, batch {result['batch_size']}")
    print(
        f"  {result['kernels_per_step']} kernels per step {result['kernels_by_op']}; compiled in {result['compile_s']:.0f} s"
    )
    print(
        f"  {result['model_flops_per_step'] / 1e9:.1f} GFLOP per step; device memory per process "
        f"{result['process_memory_bytes'] / 2**30:.2f} GiB (step {result['step_memory_bytes'] / 2**30:.2f} GiB + train split)"
    )
    print(
        f"  one process at most {low:,.0f} to {high:,.0f} images/s ({args.kernel_us[0]:g}-{args.kernel_us[1]:g} us a kernel)"
    )
    harness.emit({**result, **harness.machine()})


if __name__ == "__main__":
    main()

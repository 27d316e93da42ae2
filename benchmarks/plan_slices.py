"""Compiler estimates for models x slices x batches, one `python -m qkv_vit.plan` run each (libtpu, no TPU).

    python benchmarks/plan_slices.py                                    # N12/16 and T12/16 on v5e:2x2 at 1024
    python benchmarks/plan_slices.py --models nano_12_p16 --topologies v5e:2x2 v5e:4x4 v5e:16x16 --batches 1024 4096

Each point is configs/imagenet.py:model=M (XCiT's ImageNet recipe, bfloat16) at the global batch B on topology T,
planned in its own process one after another (libtpu lets one process compile at a time). Prints one markdown
table row per point as it is planned (per-chip batch and memory, the step-time range and images/s on the slice,
cost of the 400-epoch run at list price), then one JSON object with every plan's summary. These are compiler
estimates, not measurements (docs/benchmarks.md, "Planning a slice").
"""

import argparse
import json
import os
import subprocess
import sys
from typing import Any

import harness

from qkv_vit.train.target import MEGACORE_VERSIONS

COLUMNS = "| model | slice | batch | per chip | memory GiB | step ms | images/s | MFU % | run h | cost USD | program |"


def plan_point(model: str, topology: str, batch: int, extra: list[str], timeout: float) -> dict[str, Any]:
    megacore = topology.split(":")[0] in MEGACORE_VERSIONS
    command = [
        sys.executable, "-m", "qkv_vit.plan", f"--config=configs/imagenet.py:model={model},batch={batch}",
        f"--topology={topology}", "--nomax-batch", *(["--chip-config=megacore"] if megacore else []), *extra,
    ]  # fmt: skip
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "TF_CPP_MIN_LOG_LEVEL": "3"}
    result = subprocess.run(command, cwd=harness.REPO, env=env, capture_output=True, text=True, timeout=timeout)
    if result.returncode not in (0, 5):
        return {"model": model, "topology": topology, "batch": batch, "error": result.stderr.strip()[-500:]}
    return json.loads(result.stdout.strip().splitlines()[-1])


def row(plan: dict[str, Any]) -> str:
    if "error" in plan:
        return f"| {plan['model']} | {plan['topology']} | {plan['batch']} | error: {plan['error'][-120:]} |"
    train = plan["train"]
    low, high = (1e3 * s for s in train["seconds"])
    mfu = f"{100 * train['mfu'][0]:.1f}-{100 * train['mfu'][1]:.1f}" if train["mfu"] else "?"
    fits = "" if plan["fits"] else " (does not fit)"
    return (
        f"| {plan['model'].removeprefix('xcit_')} | {plan['topology']} | {plan['global_batch_size']} | "
        f"{plan['per_chip_batch']} | {train['memory_bytes'] / 2**30:.1f}{fits} | {low:.1f}-{high:.1f} | "
        f"{plan['images_per_s'][0]:,.0f}-{plan['images_per_s'][1]:,.0f} | {mfu} | "
        f"{plan['run_hours'][0]:.1f}-{plan['run_hours'][1]:.1f} | {plan['cost'][0]:,.0f}-{plan['cost'][1]:,.0f} | "
        f"{train['fingerprint'][:8]} |"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["nano_12_p16", "tiny_12_p16"])
    parser.add_argument("--topologies", nargs="+", default=["v5e:2x2"])
    parser.add_argument("--batches", nargs="+", type=int, default=[1024])
    parser.add_argument("--timeout", type=float, default=900)
    args, extra = parser.parse_known_args()  # anything else (--config.KEY=VALUE) goes to every plan
    print(COLUMNS)
    print("|" + "---|" * COLUMNS.count(" | ") + "---|")
    plans = []
    for model in args.models:
        for topology in args.topologies:
            for batch in args.batches:
                plans.append(plan_point(model, topology, batch, extra, args.timeout))
                print(row(plans[-1]), flush=True)
    harness.emit({"machine": harness.machine(), "plans": plans})


if __name__ == "__main__":
    main()

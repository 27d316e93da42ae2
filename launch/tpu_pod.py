"""Start one training run on every worker of a Cloud TPU VM (a pod slice or a single host).

  python -m launch.tpu_pod --tpu=my-v4-32 --zone=us-central2-b --setup \\
      --config=configs/imagenet.py:model=nano_12_p16,qkv=fsne_m8_wide,data_dir=gs://BUCKET/tensorflow_datasets \\
      --workdir=gs://BUCKET/in1k/n12_fsne_m8_wide [--dry-run] [--config.KEY=VALUE ...]

Steps: first plan: compile the run's program for the slice's topology here (`python -m qkv_vit.plan`, needs
libtpu: pip install -e '.[tpu]'), so that a config that does not fit the chips' memory is refused before the slice
is used (--no-plan skips it; --topology names the slice if --accelerator-type does not); [--create] create the TPU VM; [--setup] pack this checkout (`git ls-files`: tracked files and
untracked ones that git does not ignore), copy it to every worker and `pip install -e` it with jax[tpu];
then, on every worker at once (`gcloud compute tpus tpu-vm ssh --worker=all`),
`cd qkv_vit && python3 -m qkv_vit.main --config=... --workdir=... --distributed`: JAX finds the pod's
coordinator itself and every worker feeds its own part of each batch. The workdir must be one place that
all workers see, a gs:// bucket. Rerunning the same command resumes from the workdir's last checkpoint.
"""

import argparse
import shlex
import sys
from collections.abc import Sequence

from launch.common import REPO, Step, add_run_arguments, parse, run_steps, train_command, with_env

ARCHIVE = "qkv_vit-src.tar.gz"


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tpu", required=True, help="TPU VM name.")
    parser.add_argument("--zone", required=True)
    parser.add_argument("--project", help="Google Cloud project (default: gcloud's configured one).")
    parser.add_argument("--create", action="store_true", help="Create the TPU VM first.")
    parser.add_argument("--accelerator-type", default="v4-32", help="With --create, e.g. v4-8, v4-32, v5litepod-16.")
    parser.add_argument("--version", default="tpu-ubuntu2204-base", help="With --create: the TPU VM software version.")
    parser.add_argument("--setup", action="store_true", help="Copy this checkout to every worker and pip install it.")
    parser.add_argument("--remote-dir", default="qkv_vit", help="The checkout's directory on the workers (under ~).")
    parser.add_argument("--python", default="python3", help="The workers' Python.")
    parser.add_argument(
        "--env",
        action="append",
        default=[],
        help="KEY=VALUE for the training processes (repeatable), e.g. TFDS_DATA_DIR=gs://BUCKET/tensorflow_datasets.",
    )
    parser.add_argument(
        "--detach", action="store_true", help="Return at once; each worker logs to ~/qkv_vit-train.log."
    )
    parser.add_argument(
        "--topology", help="The slice for the plan, e.g. v5e:4x4 or v4:2x2x4 (default: from --accelerator-type)."
    )
    parser.add_argument("--no-plan", action="store_true", help="Start without planning (compiling) the run first.")
    add_run_arguments(parser)
    return parser


# Chips per slice -> the topology libtpu names it by: 2-d tori for v5e / v6e, 3-d for v4 / v5p.
TOPOLOGIES_2D = {1: "1x1", 4: "2x2", 8: "2x4", 16: "4x4", 32: "4x8", 64: "8x8", 128: "8x16", 256: "16x16"}
TOPOLOGIES_3D = {4: "2x2x1", 8: "2x2x2", 16: "2x2x4", 32: "2x4x4", 64: "4x4x4", 128: "4x4x8", 256: "4x8x8"}
# accelerator-type prefix -> (topology version, cores per chip counted in the type's number, 3-d, chip config)
ACCELERATOR_TYPES = {
    "v5litepod": ("v5e", 1, False, None),
    "v5e": ("v5e", 1, False, None),
    "v6e": ("v6e", 1, False, None),
    "v4": ("v4", 2, True, "megacore"),
    "v5p": ("v5p", 2, True, "megacore"),
}


def plan_topology(args: argparse.Namespace) -> tuple[str, str | None]:
    """(the topology to plan for, libtpu's chip config) from --topology or --accelerator-type (v4-32: 16 chips)."""
    prefix, _, count = args.accelerator_type.rpartition("-")
    version, cores, three_d, chip_config = ACCELERATOR_TYPES.get(prefix, (None, 1, False, None))
    if args.topology:
        chip_configs = {version: config for version, _, _, config in ACCELERATOR_TYPES.values()}
        return args.topology, chip_configs.get(args.topology.split(":")[0])
    shapes = TOPOLOGIES_3D if three_d else TOPOLOGIES_2D
    chips = int(count) // cores if count.isdigit() else None
    if version is None or chips not in shapes:
        raise SystemExit(
            f"error: cannot tell the topology of --accelerator-type={args.accelerator_type}: pass --topology "
            "(e.g. v5e:4x4, v4:2x2x4) or --no-plan."
        )
    return f"{version}:{shapes[chips]}", chip_config


def gcloud(args: argparse.Namespace, action: str, *extra: str) -> str:
    project = [f"--project={args.project}"] if args.project else []
    return shlex.join(["gcloud", "compute", "tpus", "tpu-vm", action, *extra, f"--zone={args.zone}", *project])


def on_all_workers(args: argparse.Namespace, command: str) -> str:
    return gcloud(args, "ssh", args.tpu, "--worker=all", f"--command={command}")


def plan(args: argparse.Namespace, overrides: Sequence[str]) -> list[Step]:
    if not args.workdir.startswith("gs://"):
        print(
            f"warning: workdir {args.workdir} is not a gs:// bucket; every worker must see the same directory.",
            file=sys.stderr,
        )
    steps = []
    if not args.no_plan:  # here, before anything is created or started: a config that does not fit stops here
        topology, chip_config = plan_topology(args)
        command = [sys.executable, "-m", "qkv_vit.plan", f"--config={args.config}", f"--topology={topology}"]
        command += [f"--chip-config={chip_config}"] if chip_config else []
        steps.append(Step((shlex.join([*command, "--nomax-batch", *overrides]),)))
    if args.create:
        steps.append(
            Step(
                (
                    gcloud(
                        args,
                        "create",
                        args.tpu,
                        f"--accelerator-type={args.accelerator_type}",
                        f"--version={args.version}",
                    ),
                )
            )
        )
    if args.setup:
        local_archive = f"/tmp/{ARCHIVE}"
        pack = (
            f"git -C {shlex.quote(str(REPO))} ls-files -co --exclude-standard -z | "
            f"tar -czf {local_archive} -C {shlex.quote(str(REPO))} --null -T -"
        )
        install = (
            f"mkdir -p {args.remote_dir} && tar -xzf {ARCHIVE} -C {args.remote_dir} && "
            f'{args.python} -m pip install -q -e ./{args.remote_dir} "jax[tpu]"'
        )
        steps += [
            Step((pack,)),
            Step((gcloud(args, "scp", local_archive, f"{args.tpu}:{ARCHIVE}", "--worker=all"),)),
            Step((on_all_workers(args, install),)),
        ]
    train = train_command(args, overrides, "--distributed", python=args.python)
    if args.detach:
        train = f"nohup {train} > ~/qkv_vit-train.log 2>&1 < /dev/null &"
    train = with_env(train, args.env)  # KEY=VALUE first: they then reach nohup and the trainer
    steps.append(Step((on_all_workers(args, f"cd {args.remote_dir} && {train}"),)))
    return steps


def main(argv: Sequence[str] | None = None) -> int:
    args, overrides = parse(parser(), argv)
    return run_steps(plan(args, overrides), args.dry_run)


if __name__ == "__main__":
    sys.exit(main())

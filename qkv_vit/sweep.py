"""Sweeps: a config file's `get_sweep(arg)` lists argument strings, one per run; each becomes a named point.

    points = expand("configs/cifar10.py", "depth=4,epochs=2")
    points[0].name    # "qkv-linear_seed-0_depth-4_epochs-2": the run's subdirectory of the sweep's workdir
    points[0].config  # "configs/cifar10.py:qkv=linear,seed=0,depth=4,epochs=2": what --config= takes

`python -m qkv_vit.sweep configs/imagenet.py code_size` prints them; launch/sweep.py starts them.
"""

import dataclasses
import importlib.util
import re
import sys
import types
from pathlib import Path

from qkv_vit.errors import ConfigError, quiet_on_broken_pipe


@dataclasses.dataclass(frozen=True)
class SweepPoint:
    name: str
    config: str


def point_name(arg: str) -> str:
    """A directory name from an argument string: "qkv=fsne,code_size=8" -> "qkv-fsne_code_size-8".

    Items whose value is a path (contains "/", e.g. init=gs://...) are left out: names say what varies.
    """
    items = [item for item in arg.split(",") if item and "/" not in item.partition("=")[2]]
    parts = [re.sub(r"[^A-Za-z0-9._]+", "-", item).strip("-") for item in items]
    return "_".join(part for part in parts if part) or "default"


def split_config_arg(config: str) -> tuple[Path, str | None]:
    """ "configs/x.py:a=1,b" -> (Path("configs/x.py"), "a=1,b"), as ml_collections' config flags split it."""
    path, _, arg = config.partition(":")
    return Path(path), arg or None


def load_config_module(path: str | Path) -> types.ModuleType:
    """Imports a config file by path, as `python -m qkv_vit.main --config=PATH` does."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Config file {path} not found; give a path such as configs/cifar10.py.")
    spec = importlib.util.spec_from_file_location(f"qkv_vit_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def expand(config_path: str | Path, sweep_arg: str | None = None) -> list[SweepPoint]:
    """Every point of the config's sweep, each checked by building its config (a typo fails here, not on a pod)."""
    module = load_config_module(config_path)
    if not hasattr(module, "get_sweep"):
        raise ConfigError(
            f"{config_path} has no get_sweep(arg): choose a config with a sweep, configs/cifar10.py, imagenet.py or "
            "transfer.py, or add get_sweep(arg) returning the points' argument strings."
        )
    points = [SweepPoint(point_name(arg), f"{config_path}:{arg}") for arg in module.get_sweep(sweep_arg)]
    names = [point.name for point in points]
    duplicates = sorted({name for name in names if names.count(name) > 1})
    if duplicates:
        raise ConfigError(
            f"The sweep of {config_path} repeats the points {duplicates}: make get_sweep() return each argument "
            "string once (a point's name leaves out values that are paths)."
        )
    for point in points:
        module.get_config(split_config_arg(point.config)[1])
    return points


@quiet_on_broken_pipe
def main(argv: list[str]) -> int:
    if len(argv) not in (2, 3):
        print("usage: python -m qkv_vit.sweep CONFIG_FILE [SWEEP_ARG]", file=sys.stderr)
        return 2
    try:
        points = expand(argv[1], argv[2] if len(argv) == 3 else None)
    except (ConfigError, FileNotFoundError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    for point in points:
        print(f"{point.name}\t{point.config}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))

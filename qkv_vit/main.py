"""python -m qkv_vit.main --config=configs/FILE.py[:args] --workdir=DIR [--config.key=value ...]

Multi-host: every process runs the same command. On SLURM or a TPU pod pass --distributed (JAX finds
the coordinator itself); elsewhere give --coordinator_address, --num_processes and --process_id.

Exit codes: 0 finished; 2 bad input (flag, config value, data, weights), 3 loss or gradients became NaN/inf,
4 storage (workdir not writable, a checkpoint write failed, no checkpoint readable), each with one `error:`
line on stderr that says what to do; 143 stopped by SIGTERM/SIGINT after saving (rerun to resume);
1 an unexpected exception (a bug: its traceback is printed).

On Linux the command first re-executes itself with a faster malloc preloaded (qkv_vit/allocator.py);
QKV_VIT_ALLOCATOR=system keeps glibc's.
"""

if __name__ == "__main__":  # before the heavy imports below, which the re-executed process then does once
    from qkv_vit.allocator import preload_allocator

    preload_allocator()

import logging
import re
import sys
from typing import NoReturn

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from qkv_vit.allocator import describe_allocator
from qkv_vit.config_rules import closest_key
from qkv_vit.errors import CheckpointError, ConfigError, one_line
from qkv_vit.train import NonFiniteError, Preempted, train_and_evaluate
from qkv_vit.train.config import RENAMED_KEYS

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/quickstart.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json; rerun to resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's auto-detection.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for a manual multi-process start.")
flags.DEFINE_integer("process_id", None, "This process's index, for a manual multi-process start.")
flags.mark_flags_as_required(["config", "workdir"])

BAD_INPUT_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
STORAGE_EXIT_CODE = 4
PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers treat it as "terminated, restart me"
EXIT_CODES = {  # errors a user can fix -> exit code; anything else is a bug and keeps its traceback
    ConfigError: BAD_INPUT_EXIT_CODE,  # DataConfigError and WeightMismatchError are ConfigErrors
    NonFiniteError: NONFINITE_EXIT_CODE,
    CheckpointError: STORAGE_EXIT_CODE,
}


# Loggers of this package: the root logger (qkv_vit logs through `logging.info` etc.) and "qkv_vit.*".
OWN_LOGGERS = ("root", "qkv_vit")


class QuietLibraries(logging.Filter):
    """On the console, the libraries' records (any logger but OWN_LOGGERS: Orbax, clu and tfds log through
    absl's logger "absl", TensorFlow through "tensorflow", JAX through "jax.*") show from WARNING up, each as its
    one-line message: their per-save INFO chatter stays off, and a failed background save is not followed by
    Orbax's traceback before our own `error:` line, which names the step and the cause. Ours show whole.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name.split(".")[0] in OWN_LOGGERS:
            return True
        if record.exc_info:
            record.exc_info = record.exc_text = None
        return record.levelno >= logging.WARNING


def quiet_libraries() -> None:
    """QuietLibraries on absl's handler, which prints every logger's records once absl's app (or a notebook's
    absl_logging.use_absl_handler()) has installed it on the root logger."""
    absl_logging.get_absl_handler().addFilter(QuietLibraries())


def fail(message: str, exit_code: int) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(exit_code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistake on the command line reported as one `error:` line (exit code 2)."""
    check_override_keys(argv)
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises only when read
    except flags.Error as error:  # a malformed value, a missing --workdir, an unknown flag, get_config's own error
        message = str(error)
        if "Traceback (most recent call last)" in message:  # config_flags quotes get_config's traceback
            fail(f"{config_argument(argv)}: {last_line(message)}", BAD_INPUT_EXIT_CODE)
        fail(f"{message.rstrip('.')}. See --helpfull for the flags.", BAD_INPUT_EXIT_CODE)
    except (AttributeError, KeyError) as error:  # an override check_override_keys let through (a bug of ours)
        fail(f"{config_argument(argv)}: cannot apply an override ({error!r}).", BAD_INPUT_EXIT_CODE)
    except OSError as error:  # the config file is missing or does not import
        fail(
            f"{config_argument(argv)}: cannot load it ({last_line(str(error))}). Pass a config "
            "file such as configs/quickstart.py, optionally with :arguments.",
            BAD_INPUT_EXIT_CODE,
        )
    return remaining


def config_argument(argv: list[str]) -> str:
    """The --config=... argument as given (the last one wins, as in absl)."""
    given = [arg for arg in argv if arg.startswith("--config=")]
    return given[-1] if given else "--config"


def last_line(message: str) -> str:
    """The line of a quoted traceback or error report that says what went wrong, without the exception's type."""
    line = [line.strip() for line in message.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]*(Error|Exception): ", "", line)


def check_override_keys(argv: list[str]) -> None:
    """Each --config.KEY=VALUE (or --[no]config.KEY for a flag) must name a key the config file has: otherwise one
    `error:` line with the closest key, or the new name of a renamed one. Checked on the config file loaded
    apart, before absl applies the overrides."""
    overrides = [arg for arg in argv[1:] if arg.startswith(("--config.", "--noconfig."))]
    config = load_config_file(argv) if overrides else None
    if config is None:  # no overrides, or a config file that does not load: parse_flags reports that
        return
    known = dotted_keys(config)
    for arg in overrides:
        key = arg.split("=", 1)[0].split("config.", 1)[1]
        if f"config.{key}" in RENAMED_KEYS:
            fail(f"{arg}: config.{key} is now called {RENAMED_KEYS[f'config.{key}']}.", BAD_INPUT_EXIT_CODE)
        if key not in known:
            close = closest_key(key, known)
            fail(
                f"{arg}: the config has no key {key!r}{f' (did you mean {close!r}?)' if close else ''}. Every "
                "key is listed in qkv_vit/train/config.py and in a run's config.json; an unknown key is an error so "
                "that a typo is never silently ignored.",
                BAD_INPUT_EXIT_CODE,
            )


def load_config_file(argv: list[str]) -> ml_collections.ConfigDict | None:
    """The config that --config=FILE[:ARGS] loads, without overrides; None if it is not given or does not load."""
    given = [arg for arg in argv[1:] if arg.startswith("--config=")]
    if not given:
        return None
    apart = flags.FlagValues()
    config_flags.DEFINE_config_file("config", None, "", flag_values=apart)
    command_line = sys.argv
    sys.argv = [argv[0], given[-1]]  # config_flags looks for --config.KEY overrides in sys.argv itself
    try:
        apart(sys.argv)
        return apart.config
    except Exception:  # noqa: BLE001 - whatever stops it loading, parse_flags reports from the real parse
        return None
    finally:
        sys.argv = command_line


def dotted_keys(config: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
    """Every leaf key of a config as "optimizer.lr", "data.augment.crop_scale", ..."""
    keys = []
    for key, value in config.items():
        if isinstance(value, ml_collections.ConfigDict):
            keys += dotted_keys(value, f"{prefix}{key}.")
        else:
            keys.append(f"{prefix}{key}")
    return keys


def initialize_distributed() -> None:
    # CPU processes need a collectives backend to talk to each other (harmless on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv: list[str]) -> int:
    del argv
    quiet_libraries()
    initialize_distributed()
    logging.info(
        "JAX process %d/%d, %d local devices of %d; memory allocator: %s.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        describe_allocator(),
    )
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as stop:
        logging.warning("%s", stop)
        return PREEMPTED_EXIT_CODE
    except tuple(EXIT_CODES) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES.items() if isinstance(error, kind))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)

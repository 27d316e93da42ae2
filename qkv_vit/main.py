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
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from qkv_vit.allocator import describe_allocator
from qkv_vit.errors import CheckpointError, ConfigError, one_line
from qkv_vit.train import NonFiniteError, Preempted, train_and_evaluate

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


class QuietLibraries(logging.Filter):
    """Keep Orbax's and TensorFlow's per-save INFO chatter off the console; warnings still show.

    Orbax logs a failed background save with its whole traceback; the run then stops with our own `error:`
    line naming the step and the cause, so Orbax's record keeps its one-line message and loses the traceback.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow/", "/jax/_src/"))
        if "/orbax/" in record.pathname and record.exc_info:
            record.exc_info = record.exc_text = None
        return record.levelno >= logging.WARNING or not noisy


def fail(message: str, exit_code: int) -> NoReturn:
    print(f"error: {one_line(message)}", file=sys.stderr)
    sys.exit(exit_code)


def parse_flags(argv: list[str]) -> list[str]:
    """absl's flag parsing, with a mistake on the command line reported as one `error:` line (exit code 2)."""
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises only when read
    except flags.Error as error:  # a malformed value, a missing --workdir, an unknown flag, get_config's own error
        message = str(error)
        if "Traceback (most recent call last)" in message:  # config_flags quotes get_config's traceback
            fail(f"{config_argument(argv)}: {last_line(message)}", BAD_INPUT_EXIT_CODE)
        fail(f"{message.rstrip('.')}. See --helpfull for the flags.", BAD_INPUT_EXIT_CODE)
    except (AttributeError, KeyError) as error:  # config_flags: --config.<key> the config does not have
        fail(unknown_key_message(argv, error), BAD_INPUT_EXIT_CODE)
    except OSError as error:  # the config file is missing or does not import
        fail(f"{config_argument(argv)}: cannot load it ({last_line(str(error))}). Pass a config "
             "file such as configs/quickstart.py, optionally with :arguments.", BAD_INPUT_EXIT_CODE)
    return remaining


def config_argument(argv: list[str]) -> str:
    """The --config=... argument as given (the last one wins, as in absl)."""
    given = [arg for arg in argv if arg.startswith("--config=")]
    return given[-1] if given else "--config"


def last_line(message: str) -> str:
    """The line of a quoted traceback or error report that says what went wrong, without the exception's type."""
    line = [line.strip() for line in message.splitlines() if line.strip()][-1]
    return re.sub(r"^[\w.]*(Error|Exception): ", "", line)


def unknown_key_message(argv: list[str], error: BaseException) -> str:
    while not isinstance(error, KeyError) and error.__context__ is not None:
        error = error.__context__  # config_dict raises AttributeError from the KeyError that has the hint
    detail = one_line(str(error.args[0])) if error.args else str(error)  # "'optimzer' Did you mean ...?"
    key = detail.split("'")[1] if detail.count("'") >= 2 else detail
    hint = detail.split("'", 2)[2].strip() if detail.count("'") >= 2 else ""
    given = [arg for arg in argv if arg.startswith("--config.") and key in arg.split("=")[0].split(".")]
    return (f"{given[0] if given else '--config'}: the config has no key {key!r}"
            + (f" ({hint[0].lower()}{hint[1:]})" if hint else "")
            + ". Every key is listed in qkv_vit/train/config.py and in a run's config.json; an unknown key is an "
            "error so that a typo is never silently ignored.")


def initialize_distributed() -> None:
    # CPU processes need a collectives backend to talk to each other (harmless on GPU/TPU).
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()


def main(argv: list[str]) -> int:
    del argv
    absl_logging.get_absl_logger().addFilter(QuietLibraries())
    initialize_distributed()
    logging.info("JAX process %d/%d, %d local devices of %d; memory allocator: %s.", jax.process_index(),
                 jax.process_count(), jax.local_device_count(), jax.device_count(), describe_allocator())
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

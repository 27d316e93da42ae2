"""python -m qkv_vit.main --config=configs/FILE.py[:args] --workdir=DIR [--config.key=value ...]

Multi-host: every process runs the same command. On SLURM or a TPU pod pass --distributed (JAX finds
the coordinator itself); elsewhere give --coordinator_address, --num_processes and --process_id.

Exit codes: 0 finished; 2 bad input (flag, config value, data, weights), 3 loss or gradients became NaN/inf,
4 storage (a full, read-only or unwritable disk under the workdir or the data cache, no checkpoint readable),
each with one `error:` line on stderr that says what to do; 143 stopped by SIGTERM or SIGINT (Ctrl-C) at any
time, after saving a checkpoint when it came during training (rerun the same command to resume); 1 an
unexpected exception (a bug: its traceback is printed).

On Linux the command first re-executes itself with a faster malloc preloaded (qkv_vit/allocator.py);
QKV_VIT_ALLOCATOR=system keeps glibc's.
"""

if __name__ == "__main__":  # before the heavy imports below, which the re-executed process then does once
    from qkv_vit.allocator import preload_allocator

    preload_allocator()

    from qkv_vit.interrupts import stop_on_signals

    stop_on_signals()  # from here on SIGTERM/SIGINT stop cleanly: temporaries removed, exit 143, no traceback

import logging
import sys
import traceback
import types
from pathlib import Path
from typing import NoReturn

import jax
import ml_collections
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from qkv_vit.allocator import describe_allocator
from qkv_vit.config_rules import closest_key
from qkv_vit.errors import ConfigError, StorageError, one_line
from qkv_vit.interrupts import STOPPED_EXIT_CODE, Interrupted, stop_on_signals
from qkv_vit.train import NonFiniteError, Preempted, run_record, train_and_evaluate
from qkv_vit.train.config import RENAMED_KEYS

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/quickstart.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json; rerun to resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's auto-detection.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for a manual multi-process start.")
flags.DEFINE_integer("process_id", None, "This process's index, for a manual multi-process start.")
flags.DEFINE_bool(
    "allow_config_change",
    False,
    "Resume a workdir under a config that changes what is trained (seed, optimizer, model, data, ...); the change is "
    "recorded in WORKDIR/config_changes.jsonl. Without it such a rerun is refused.",
)
flags.mark_flags_as_required(["config", "workdir"])

BAD_INPUT_EXIT_CODE = 2
NONFINITE_EXIT_CODE = 3
STORAGE_EXIT_CODE = 4
EXIT_CODES = {  # errors a user can fix -> exit code; anything else is a bug and keeps its traceback
    ConfigError: BAD_INPUT_EXIT_CODE,  # DataConfigError and WeightMismatchError are ConfigErrors
    NonFiniteError: NONFINITE_EXIT_CODE,
    StorageError: STORAGE_EXIT_CODE,  # CheckpointError is a StorageError
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
    """absl's flag parsing, with a mistake on the command line or in the config file reported as one `error:` line
    (exit code 2)."""
    argv = joined_config_flag(argv)
    config = load_config_file(argv)  # the file's own mistakes, before absl loads it again and applies overrides
    if config is not None:
        check_override_keys(argv, config)
    try:
        remaining = FLAGS(argv)
        FLAGS.config.keys()  # a config file that failed to load raises only when read
    except flags.Error as error:  # a malformed value, a missing --workdir, an unknown flag
        fail(f"{str(error).rstrip('.')}. See --helpfull for the flags.", BAD_INPUT_EXIT_CODE)
    except (AttributeError, KeyError, OSError) as error:  # an override check_override_keys let through (a bug of ours)
        fail(f"{config_argument(argv)}: cannot apply an override ({error!r}).", BAD_INPUT_EXIT_CODE)
    return remaining


def joined_config_flag(argv: list[str]) -> list[str]:
    """`--config FILE` (absl takes both forms) as `--config=FILE`, the form the checks below read."""
    joined, args = [], iter(argv)
    for arg in args:
        joined.append(f"--config={next(args, '')}" if arg == "--config" else arg)
    return joined


def config_argument(argv: list[str]) -> str:
    """The --config=... argument as given (the last one wins, as in absl)."""
    given = [arg for arg in argv if arg.startswith("--config=")]
    return given[-1] if given else "--config"


def load_config_file(argv: list[str]) -> ml_collections.ConfigDict | None:
    """What --config=FILE[:ARG] gives, loaded as config_flags loads it (get_config(ARG) of the file executed as a
    module), with every way that can fail reported as one `error:` line naming the file, the line and the problem:
    a missing file, a syntax error, an exception while it runs or in get_config, no get_config, no ConfigDict.
    None without a --config (absl reports that)."""
    given = [arg for arg in argv[1:] if arg.startswith("--config=")]
    if not given:
        return None
    argument = given[-1]
    path, *config_string = argument.split("=", 1)[1].split(":", 1)  # as config_flags splits it

    def bad(problem: str) -> NoReturn:
        fail(f"{argument}: {problem}", BAD_INPUT_EXIT_CODE)

    try:
        code = compile(Path(path).read_bytes(), path, "exec")
    except OSError as error:
        bad(
            f"cannot read {path} ({error.strerror}). Pass a config file such as configs/quickstart.py, optionally "
            "with :arguments."
        )
    except SyntaxError as error:
        bad(f"{syntax_error_place(error, path)}: {error.msg}.")
    module = types.ModuleType("config_config")
    module.__file__ = path
    sys.modules[module.__name__] = module  # as importlib's loader does (dataclasses in a config file look it up)
    try:
        exec(code, module.__dict__)  # noqa: S102 - running the user's config file is what --config asks for
        get_config = getattr(module, "get_config", None)
        if not callable(get_config):
            bad(
                f"the file has no get_config function (it defines {public_names(module) or 'nothing'}). A config "
                "file defines get_config(arg=None) returning an ml_collections.ConfigDict, as configs/quickstart.py "
                "does."
            )
        config = get_config(*config_string)
    except SyntaxError as error:  # in a module the config file imports
        bad(f"{syntax_error_place(error, path)}: {error.msg}.")
    except ConfigError as error:  # get_config's own check of its argument says what to do already
        bad(str(error))
    except Exception as error:  # noqa: BLE001 - whatever the user's code raises is reported, with its place
        bad(f"{exception_place(error, path)}: {type(error).__name__}: {error}")
    if not isinstance(config, ml_collections.ConfigDict):
        bad(
            f"get_config() returned {type(config).__name__}, not an ml_collections.ConfigDict"
            f"{' (a missing return statement?)' if config is None else ''}."
        )
    return config


def syntax_error_place(error: SyntaxError, path: str) -> str:
    """Where a syntax error is: "line N" in the config file, "FILE, line N" in a module it imports."""
    return f"line {error.lineno}" if error.filename == path else f"{error.filename}, line {error.lineno}"


def exception_place(error: BaseException, path: str) -> str:
    """Where an exception came from: "line N" of the config file, and the innermost line if that is elsewhere."""
    frames = traceback.extract_tb(error.__traceback__)
    own = [frame for frame in frames if frame.filename == path]
    if not own:
        return "calling get_config"
    place = f"line {own[-1].lineno}"
    if frames[-1] is not own[-1]:
        place += f" (raised in {frames[-1].filename}, line {frames[-1].lineno})"
    return place


def public_names(module: types.ModuleType) -> str:
    names = [name for name, value in vars(module).items() if callable(value) and not name.startswith("_")]
    return ", ".join(names[:5])


def check_override_keys(argv: list[str], config: ml_collections.ConfigDict) -> None:
    """Each --config.KEY=VALUE (or --[no]config.KEY for a flag) must name a key the config file has: otherwise one
    `error:` line with the closest key, or the new name of a renamed one. Checked on the config file loaded
    apart, before absl applies the overrides."""
    overrides = [arg for arg in argv[1:] if arg.startswith(("--config.", "--noconfig."))]
    known = list(run_record.flatten(config.to_dict()))  # "optimizer.lr", "data.augment.crop_scale", ...
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
    stop_on_signals()  # again: jax.distributed's preemption service installs its own SIGTERM handler
    logging.info(
        "JAX process %d/%d, %d local devices of %d; memory allocator: %s.",
        jax.process_index(),
        jax.process_count(),
        jax.local_device_count(),
        jax.device_count(),
        describe_allocator(),
    )
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
    except Preempted as stop:
        logging.warning("%s", stop)
        return STOPPED_EXIT_CODE
    except Interrupted as stop:
        logging.warning(
            "Stopped by %s outside the train loop (nothing to save; what was being built was removed): rerun the same "
            "command to go on.",
            stop.signal_name,
        )
        return STOPPED_EXIT_CODE
    except tuple(EXIT_CODES) as error:
        print(f"error: {one_line(str(error))}", file=sys.stderr)
        return next(code for kind, code in EXIT_CODES.items() if isinstance(error, kind))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=parse_flags)

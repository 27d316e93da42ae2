"""python -m qkv_vit.main --config=configs/FILE.py[:args] --workdir=DIR [--config.key=value ...]

Multi-host: every process runs the same command, with --distributed on SLURM or a TPU pod (JAX finds the
coordinator), elsewhere with --coordinator_address, --num_processes and --process_id.

Exit codes: 0 finished; 2 bad input (flag, config value, data, weights), 3 loss or gradients became NaN/inf, 4
storage (a full, read-only or unwritable disk under the workdir or the data cache, no checkpoint readable), each
with one `error:` line on stderr that says what to do; 143 stopped by SIGTERM or SIGINT (Ctrl-C) at any time,
after saving a checkpoint when it came during training (rerun to resume); 1 a bug (its traceback is printed).

On Linux it first re-executes itself with a faster malloc preloaded (qkv_vit/allocator.py; QKV_VIT_ALLOCATOR=system).
"""

if __name__ == "__main__":  # before the heavy imports below, which the re-executed process then does once
    from qkv_vit.allocator import preload_allocator

    preload_allocator()

    from qkv_vit.interrupts import stop_on_signals

    stop_on_signals()  # from here on SIGTERM/SIGINT stop cleanly: temporaries removed, exit 143, no traceback

import logging
import sys

import jax
from absl import app, flags

from qkv_vit import config_file
from qkv_vit.allocator import describe_allocator
from qkv_vit.errors import ConfigError, StorageError
from qkv_vit.interrupts import STOPPED_EXIT_CODE, Interrupted, stop_on_signals
from qkv_vit.train import NonFiniteError, Preempted, train_and_evaluate
from qkv_vit.train.logging_utils import quiet_libraries

FLAGS = flags.FLAGS
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json; rerun to resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's auto-detection.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for a manual multi-process start.")
flags.DEFINE_integer("process_id", None, "This process's index, for a manual multi-process start.")
ALLOW_HELP = "Resume a workdir under a config that changes what is trained (recorded in WORKDIR/config_changes.jsonl)."
flags.DEFINE_bool("allow_config_change", False, ALLOW_HELP)
flags.mark_flags_as_required(["workdir"])

# Errors a user can fix -> exit code (DataConfigError and WeightMismatchError are ConfigErrors, CheckpointError a
# StorageError); anything else is a bug and keeps its traceback.
EXIT_CODES = {ConfigError: config_file.BAD_INPUT_EXIT_CODE, NonFiniteError: 3, StorageError: 4}


def main(argv: list[str]) -> int:
    del argv
    quiet_libraries()
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes talk through gloo
    if FLAGS.coordinator_address:
        jax.distributed.initialize(FLAGS.coordinator_address, FLAGS.num_processes, FLAGS.process_id)
    elif FLAGS.distributed:
        jax.distributed.initialize()
    stop_on_signals()  # again: jax.distributed's preemption service installs its own SIGTERM handler
    devices = (jax.process_index(), jax.process_count(), jax.local_device_count(), jax.device_count())
    logging.info("JAX process %d/%d, %d local devices of %d; memory allocator: %s.", *devices, describe_allocator())
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir, FLAGS.allow_config_change)
    except Preempted as stop:
        logging.warning("%s", stop)
        return STOPPED_EXIT_CODE
    except Interrupted as stop:  # nothing to save; what was being built was removed
        logging.warning("Stopped by %s outside the train loop: rerun the same command to go on.", stop.signal_name)
        return STOPPED_EXIT_CODE
    except tuple(EXIT_CODES) as error:
        config_file.fail(str(error), next(code for kind, code in EXIT_CODES.items() if isinstance(error, kind)))
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_file.parse_flags)

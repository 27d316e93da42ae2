"""python -m qkv_vit.main --config=configs/FILE.py[:args] --workdir=DIR [--config.key=value ...]

Multi-host: every process runs the same command. On SLURM or a TPU pod pass --distributed (JAX finds
the coordinator itself); elsewhere give --coordinator_address, --num_processes and --process_id.
"""

import logging
import sys

import jax
from absl import app, flags
from absl import logging as absl_logging
from ml_collections import config_flags

from qkv_vit.train import NonFiniteError, Preempted, train_and_evaluate

FLAGS = flags.FLAGS
config_flags.DEFINE_config_file("config", None, "Training config file, e.g. configs/quickstart.py.", lock_config=True)
flags.DEFINE_string("workdir", None, "Directory for checkpoints, metrics and config.json; rerun to resume.")
flags.DEFINE_bool("distributed", False, "Call jax.distributed.initialize() with the cluster's auto-detection.")
flags.DEFINE_string("coordinator_address", None, "host:port of process 0, for a manual multi-process start.")
flags.DEFINE_integer("num_processes", None, "Number of processes, for a manual multi-process start.")
flags.DEFINE_integer("process_id", None, "This process's index, for a manual multi-process start.")
flags.mark_flags_as_required(["config", "workdir"])

PREEMPTED_EXIT_CODE = 143  # 128 + SIGTERM: schedulers treat it as "terminated, restart me"
NONFINITE_EXIT_CODE = 3


class QuietLibraries(logging.Filter):
    """Keep Orbax's and TensorFlow's per-save INFO chatter off the console; warnings still show."""

    def filter(self, record: logging.LogRecord) -> bool:
        noisy = any(part in record.pathname for part in ("/orbax/", "/tensorflow/", "/jax/_src/"))
        return record.levelno >= logging.WARNING or not noisy


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
    logging.info("JAX process %d/%d, %d local devices of %d.", jax.process_index(), jax.process_count(),
                 jax.local_device_count(), jax.device_count())
    try:
        train_and_evaluate(FLAGS.config, FLAGS.workdir)
    except Preempted as stop:
        logging.warning("%s", stop)
        return PREEMPTED_EXIT_CODE
    except NonFiniteError as error:
        logging.error("%s", error)
        print(f"error: {error}", file=sys.stderr)
        return NONFINITE_EXIT_CODE
    return 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)))

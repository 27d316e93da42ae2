"""python -m qkv_vit.plan --config=configs/FILE.py[:args] [--topology=v5e:16x16] [--chip-config megacore]
    [--price-per-chip-hour=1.2] [--nomax-batch] [--config.key=value ...]

Compiles the train and eval steps the trainer would run for the config on a TPU slice (--topology; without it, on
this machine's devices) and prints, per chip, memory against HBM, flops, bytes moved, a step-time range,
images/s, the run's time, chip-hours and cost, every collective, warnings, and the train step's fingerprint
(which the trainer logs before its first step); the last line is the plan as one JSON object. Compiling for a TPU
needs libtpu (pip install -e '.[tpu]'; a TPU VM has it), not a TPU. Exit codes: 0 the config fits, 5 it does
not fit the chips' memory, 2 bad input (one `error:` line).
"""

import json
import sys

import jax
from absl import app, flags

from qkv_vit import config_file
from qkv_vit.errors import ConfigError
from qkv_vit.plan.planning import plan
from qkv_vit.plan.report import report, summary
from qkv_vit.train.logging_utils import quiet_libraries
from qkv_vit.train.target import Target

DOES_NOT_FIT_EXIT_CODE = 5

FLAGS = flags.FLAGS
flags.DEFINE_string("topology", None, "A TPU topology, e.g. v5e:2x2, v5e:16x16, v4:2x2x4 (None: this machine).")
flags.DEFINE_string("chip-config", None, "libtpu's chip config: megacore for v4 and v5p, as their VMs run.")
flags.DEFINE_float("price-per-chip-hour", None, "USD per chip-hour (default: the chip's on-demand list price).")
flags.DEFINE_bool("max-batch", True, "Compile once more at half the batch to estimate the largest that fits.")


def main(argv: list[str]) -> int:
    del argv
    quiet_libraries()
    price = FLAGS["price-per-chip-hour"].value
    try:
        if FLAGS.topology:
            jax.config.update("jax_platforms", "cpu")  # nothing runs here: no backend should look for a TPU
            target = Target.topology(FLAGS.topology, FLAGS["chip-config"].value)
        else:
            target = Target.present()
        planned = plan(FLAGS.config, target, max_batch=FLAGS["max-batch"].value)
    except ConfigError as error:
        config_file.fail(str(error))
    print(report(planned, price))
    print(json.dumps(summary(planned, price)), flush=True)
    return DOES_NOT_FIT_EXIT_CODE if planned.fits is False else 0


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_file.parse_flags)

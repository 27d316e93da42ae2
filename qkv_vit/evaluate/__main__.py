"""python -m qkv_vit.evaluate WEIGHTS --config=configs/FILE.py[:args] [--splits=test,train] [--ema]
    [--ood=SOURCE[:NAME_OR_PATH[:SPLIT]] ...] [--nomahalanobis] [--corruptions=cifar10_c|imagenet_c|TEMPLATE
    [--corruption_names=...] [--severities=1,2,3,4,5] [--baseline=OTHER/evaluation.json]] [--output=FILE.json]
    [--config.key=value ...]

Evaluates WEIGHTS (a run directory: its latest checkpoint; a step directory, WORKDIR/checkpoints/STEP; or
converted weights) on splits of the config's data (default: its eval split), with the config's eval
preprocessing, over every example exactly once: top-1, top-5, loss, expected calibration error and per-class
accuracy. With --ood, scores each out-of-distribution data set against the first split (maximum softmax
probability, max logit, energy, Mahalanobis on the pre-logit features with class statistics from the train
split) and reports AUROC, FPR at 95% TPR and AUPR. With --corruptions, the top-1 error on each corrupted copy
of the data (ImageNet-C, CIFAR-10-C through tfds, or any data set with {corruption} and {severity} in it), and the
mCE against --baseline. Prints a line per split, OOD score and corrupted set, and writes the
whole result as JSON to --output (default: WEIGHTS/evaluation.json). Exit code 2 on bad input, with one `error:`
line.
"""

import json
import logging
import sys

from absl import app, flags
from etils import epath

from qkv_vit import config_file
from qkv_vit.errors import CheckpointError, ConfigError
from qkv_vit.evaluate.evaluation import CIFAR10_C, IMAGENET_C, Corruptions, evaluate
from qkv_vit.metrics import corruption
from qkv_vit.train.evaluators import DataSpec
from qkv_vit.train.logging_utils import quiet_libraries

FLAGS = flags.FLAGS
flags.DEFINE_list("splits", [], "Splits of the config's data to evaluate (default: its eval split).")
flags.DEFINE_bool("ema", False, "Evaluate the run's EMA parameters.")
flags.DEFINE_multi_string("ood", [], "An OOD data set, SOURCE[:NAME_OR_PATH[:SPLIT]], e.g. tfds:svhn_cropped:test.")
flags.DEFINE_bool("mahalanobis", True, "With --ood, fit class statistics on the train split for the Mahalanobis score.")
flags.DEFINE_string("output", None, "Where the JSON result goes (default: WEIGHTS/evaluation.json).")
flags.DEFINE_string(
    "corruptions",
    None,
    "Corrupted copies of the data, {corruption} and {severity} in a data set: cifar10_c, imagenet_c, "
    "or e.g. image_folder:/data/c/{corruption}/{severity}:test.",
)
flags.DEFINE_list("corruption_names", list(corruption.CORRUPTIONS), "The corruptions (default: the 15 of the mCE).")
flags.DEFINE_list("severities", [str(s) for s in corruption.SEVERITIES], "The severities.")
flags.DEFINE_string("baseline", None, "Another evaluation's JSON with --corruptions: CE and mCE against it.")

NAMED_CORRUPTIONS = {"cifar10_c": CIFAR10_C, "imagenet_c": IMAGENET_C}


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        config_file.fail("give one WEIGHTS argument: a run directory, a step directory or converted weights.")
    weights = argv[1]
    quiet_libraries()
    logging.getLogger().setLevel(logging.INFO)
    try:
        ood_data = [DataSpec.parse(spec) for spec in FLAGS.ood]
        result = evaluate(
            weights,
            FLAGS.config,
            FLAGS.splits,
            use_ema=FLAGS.ema,
            ood_data=ood_data,
            mahalanobis=FLAGS.mahalanobis,
            corruptions=corruptions_from_flags(),
        )
    except (ConfigError, CheckpointError, FileNotFoundError) as error:
        config_file.fail(str(error))
    output = epath.Path(FLAGS.output or epath.Path(weights) / "evaluation.json")
    try:
        output.write_text(json.dumps(result, indent=1) + "\n")
    except OSError as error:
        config_file.fail(f"cannot write {output} ({error}); choose another place with --output=FILE.json.")
    print(f"Results in {output}.")
    return 0


def corruptions_from_flags() -> Corruptions | None:
    """--corruptions and its companions; ConfigError for a severity that is no integer or an unreadable baseline."""
    if not FLAGS.corruptions:
        return None
    try:
        severities = [int(severity) for severity in FLAGS.severities]
    except ValueError:
        raise ConfigError(f"--severities={','.join(FLAGS.severities)}: give integers, e.g. 1,2,3,4,5.") from None
    baseline = None
    if FLAGS.baseline:
        try:
            baseline = json.loads(epath.Path(FLAGS.baseline).read_text())["corruptions"]
        except (OSError, ValueError, KeyError) as error:
            raise ConfigError(
                f"--baseline={FLAGS.baseline}: not an evaluation with corruptions ({error!r}); give the "
                "evaluation.json of a run evaluated with the same --corruptions."
            ) from error
    template = NAMED_CORRUPTIONS.get(FLAGS.corruptions, FLAGS.corruptions)
    return Corruptions(template, FLAGS.corruption_names, severities, baseline)


if __name__ == "__main__":
    app.run(lambda argv: sys.exit(main(argv)), flags_parser=config_file.parse_flags)

"""The offline default data set: scikit-learn's 8x8 handwritten digits as a tfds builder.

scikit-learn ships these 1,797 real images inside its wheel, so this works on a fresh machine with
no network and no data. Prepared once into a tfds directory, it goes through exactly the reading,
sharding and preprocessing code that ImageNet does.
"""

from __future__ import annotations

import numpy as np
import tensorflow_datasets as tfds

from qkv_vit.data._tensorflow import tf  # noqa: F401  (configures TF before tfds touches it)

NAME = "sklearn_digits"
# Every 5th image is held out: a fixed, class-balanced-enough split of 1,437 train / 360 test.
_TEST_EVERY = 5


class SklearnDigits(tfds.core.GeneratorBasedBuilder):
    """scikit-learn's digits (UCI optical recognition of handwritten digits), 8x8 grey, 10 classes."""

    VERSION = tfds.core.Version("1.0.0")

    def _info(self) -> tfds.core.DatasetInfo:
        return self.dataset_info_from_configs(
            description=__doc__,
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(8, 8, 1)),
                    "label": tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
                    "index": np.int64,  # position in sklearn's array, to check coverage and sharding
                }
            ),
            supervised_keys=("image", "label"),
            homepage="https://scikit-learn.org/stable/datasets/toy_dataset.html#digits-dataset",
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download: the data ship with scikit-learn
        return {"train": self._generate_examples(test=False), "test": self._generate_examples(test=True)}

    def _generate_examples(self, test: bool):
        from sklearn.datasets import load_digits  # imported here: only preparation needs scikit-learn

        digits = load_digits()
        # Pixel values are counts 0..16; spread them over 0..255.
        images = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
        for index, (image, label) in enumerate(zip(images, digits.target)):
            if (index % _TEST_EVERY == 0) == test:
                yield index, {"image": image, "label": int(label), "index": index}

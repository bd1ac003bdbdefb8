"""TFDS builder for the stepmath domain: array_record files, read with `tfds.data_source`.

Configs are level sets ("easy" = levels 1-3, "hard" = 4-5, "all" = 1-5); each has a `train`
and a `test` split drawn by `stepmath.splits` (per level, no overlap), so a level's problems
are the same in every config that contains it. Every example is `stepmath.to_record(p)`:

    {"prompt": str, "response": str, "level": int32, "answer": str, "uid": str}

(text features come back from `tfds.data_source` as UTF-8 bytes; `pipeline.SftFeaturizer`
and `stepmath.from_record` accept bytes).

No TensorFlow: tensorflow-datasets 4.9.10 serializes examples with its own protobuf code and
writes `array_record` through the `array_record` package when `file_format="array_record"`
(the default of this builder), and `tfds.data_source` reads them back as a random-access
sequence of numpy dicts that grain consumes directly.

    from scalign.data import tfds_stepmath
    path = tfds_stepmath.build("easy", data_dir="/tmp/tfds")            # writes once
    train = tfds_stepmath.data_source("easy", split="train", data_dir="/tmp/tfds")
    ds = grain.MapDataset.source(train)

Custom sizes: `build("easy", data_dir=..., n_train=2000, n_test=200)` writes a config named
"easy_n2000_t200_s0" (the name records the sizes, so different sizes never overwrite each other).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from scalign.data import stepmath

LEVEL_SETS: dict[str, tuple[int, ...]] = {"easy": (1, 2, 3), "hard": (4, 5), "all": (1, 2, 3, 4, 5)}
DEFAULT_N_TRAIN = 5000
DEFAULT_N_TEST = 500
DEFAULT_SEED = 0


@dataclasses.dataclass
class StepMathConfig(tfds.core.BuilderConfig):
    """A level set and the split sizes (per level) and seed of `stepmath.splits`."""

    levels: tuple[int, ...] = (1, 2, 3)
    n_train: int = DEFAULT_N_TRAIN
    n_test: int = DEFAULT_N_TEST
    seed: int = DEFAULT_SEED
    design: str = stepmath.DEFAULT_DESIGN


def make_config(level_set: str, *, n_train: int = DEFAULT_N_TRAIN,
                n_test: int = DEFAULT_N_TEST, seed: int = DEFAULT_SEED,
                design: str = stepmath.DEFAULT_DESIGN) -> StepMathConfig:
    """The config of a named level set; non-default sizes/seed/design get a distinct name."""
    if level_set not in LEVEL_SETS:
        raise ValueError(f"unknown stepmath level set {level_set!r}; known: {sorted(LEVEL_SETS)}")
    name = level_set
    if (n_train, n_test, seed) != (DEFAULT_N_TRAIN, DEFAULT_N_TEST, DEFAULT_SEED):
        name += f"_n{n_train}_t{n_test}_s{seed}"
    if design != stepmath.DEFAULT_DESIGN:
        name += f"_{design}"
    levels = LEVEL_SETS[level_set]
    return StepMathConfig(
        name=name, levels=levels, n_train=n_train, n_test=n_test, seed=seed, design=design,
        description=(f"stepmath design {design!r}, levels {list(levels)}: {n_train} train and "
                     f"{n_test} test problems per level, seed {seed}"))


class Stepmath(tfds.core.GeneratorBasedBuilder):
    """Synthetic graded chain arithmetic with step-by-step solutions (PRM800K layout)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: levels 1-5 of the 'graded' design."}
    BUILDER_CONFIGS = [make_config(name) for name in LEVEL_SETS]
    DEFAULT_CONFIG_NAME = "easy"

    # tfds 4.9.10's `code_path` touches `importlib_resources.abc` for builders defined in an
    # installed package, but declares that backport only for Python < 3.9, so on 3.11 it
    # raises ModuleNotFoundError. The module file is the answer it would compute.
    @tfds.core.utils.classproperty
    @classmethod
    def code_path(cls) -> epath.Path:
        return epath.Path(__file__)

    def __init__(self, *, file_format: str | None = None, **kwargs: Any):
        super().__init__(file_format=file_format or "array_record", **kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        # DatasetInfo directly: `dataset_info_from_configs` reads metadata files next to the
        # module (a TFDS-catalogue layout this package does not have).
        return tfds.core.DatasetInfo(
            builder=self,
            description=__doc__.split("\n\n")[0],
            features=tfds.features.FeaturesDict({
                "prompt": tfds.features.Text(),
                "response": tfds.features.Text(),
                "level": np.int32,
                "answer": tfds.features.Text(),
                "uid": tfds.features.Text(),
            }),
            supervised_keys=("prompt", "response"),
        )

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict]]]:
        del dl_manager  # nothing is downloaded
        cfg: StepMathConfig = self.builder_config  # type: ignore[assignment]
        spl = stepmath.splits(cfg.levels, cfg.n_train, cfg.n_test, cfg.seed, design=cfg.design)
        return {"train": self._generate_examples([p for lv in cfg.levels for p in spl[lv].train]),
                "test": self._generate_examples([p for lv in cfg.levels for p in spl[lv].test])}

    def _generate_examples(self, problems: list[stepmath.Problem]
                           ) -> Iterator[tuple[str, dict[str, Any]]]:
        for p in problems:
            yield p.uid, stepmath.to_record(p)


def builder(level_set: str, *, data_dir: str | epath.PathLike, **config_kwargs: Any
            ) -> Stepmath:
    """The builder of a level set (a registered config by name, else a custom config)."""
    cfg = make_config(level_set, **config_kwargs)
    config = cfg.name if cfg.name in Stepmath.builder_configs else cfg
    return Stepmath(config=config, data_dir=str(data_dir))


def build(level_set: str, *, data_dir: str | epath.PathLike, **config_kwargs: Any) -> epath.Path:
    """Write (once) the config's array_record files under `data_dir`; returns their folder."""
    b = builder(level_set, data_dir=data_dir, **config_kwargs)
    b.download_and_prepare()
    return epath.Path(b.data_dir)


def data_source(level_set: str, *, split: str, data_dir: str | epath.PathLike,
                **config_kwargs: Any) -> Any:
    """`tfds.data_source` over a built config (a random-access sequence of numpy dicts).

    Raises FileNotFoundError naming the folder when the config has not been built yet.
    """
    b = builder(level_set, data_dir=data_dir, **config_kwargs)
    if not b.is_prepared():
        raise FileNotFoundError(f"stepmath config {b.builder_config.name!r} is not built under "
                                f"{b.data_dir}; call tfds_stepmath.build(...) first")
    return tfds.data_source(b.name, split=split, data_dir=str(data_dir), download=False,
                            builder_kwargs={"config": b.builder_config})

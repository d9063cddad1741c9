"""Training drafters for selfspec: data -> self-distillation -> features -> training -> calibration.

    from selfspec.training import Settings, RunConfig, DataConfig, TrainConfig, run
    run(Settings(run=RunConfig(out="my-drafter"), data=DataConfig(sources=["prompts.jsonl"]), ...))

or, from the shell, ``selfspec train --data prompts.jsonl --preset quick --out my-drafter``.
Each stage is usable alone: ``load_all`` (data), ``distill``, ``capture``/``load_features``,
``Trainer``, ``calibrate``, ``export``.
"""

from selfspec.training.calibrate import Calibration, CalibrationConfig, calibrate, measure_acceptance
from selfspec.training.data import DataConfig, DataReport, Example, load_all, load_examples
from selfspec.training.distill import DistillConfig, DistillReport, distill
from selfspec.training.export import export
from selfspec.training.features import FeatureConfig, FeatureReport, Sequence, capture
from selfspec.training.features import load as load_features
from selfspec.training.pipeline import RunConfig, Settings, run, save_drafter
from selfspec.training.presets import PRESETS
from selfspec.training.trainer import TrainConfig, Trainer, TrainResult, measure_tau

__all__ = [
    "PRESETS",
    "Calibration",
    "CalibrationConfig",
    "DataConfig",
    "DataReport",
    "DistillConfig",
    "DistillReport",
    "Example",
    "FeatureConfig",
    "FeatureReport",
    "RunConfig",
    "Sequence",
    "Settings",
    "TrainConfig",
    "TrainResult",
    "Trainer",
    "calibrate",
    "capture",
    "distill",
    "export",
    "load_all",
    "load_examples",
    "load_features",
    "measure_acceptance",
    "measure_tau",
    "run",
    "save_drafter",
]

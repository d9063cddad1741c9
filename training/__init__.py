"""Training drafters for selfspec: data -> self-distillation -> features -> training -> calibration.

    from selfspec.training import Settings, RunConfig, DataConfig, TrainConfig, run
    run(Settings(run=RunConfig(out="my-drafter"), data=DataConfig(sources=["prompts.jsonl"]), ...))

or, from the shell, ``selfspec train --data prompts.jsonl --preset quick --out my-drafter``.
Each stage is usable alone: ``load_all`` (data), ``distill``, ``capture``/``load_features``,
``Trainer``, ``calibrate``, ``export``. The names are imported on first use (PEP 562), so the
configs and ``selfspec train --help`` do not load torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_HOME = {  # name -> (module, attribute)
    "Calibration": ("selfspec.training.calibration", "Calibration"),
    "calibrate": ("selfspec.training.calibration", "calibrate"),
    "measure_acceptance": ("selfspec.training.calibration", "measure_acceptance"),
    "CalibrationConfig": ("selfspec.training.config", "CalibrationConfig"),
    "DataConfig": ("selfspec.training.config", "DataConfig"),
    "DistillConfig": ("selfspec.training.config", "DistillConfig"),
    "FeatureConfig": ("selfspec.training.config", "FeatureConfig"),
    "RunConfig": ("selfspec.training.config", "RunConfig"),
    "Settings": ("selfspec.training.config", "Settings"),
    "TrainConfig": ("selfspec.training.config", "TrainConfig"),
    "DataReport": ("selfspec.training.data", "DataReport"),
    "Example": ("selfspec.training.data", "Example"),
    "load_all": ("selfspec.training.data", "load_all"),
    "load_examples": ("selfspec.training.data", "load_examples"),
    "DistillReport": ("selfspec.training.distillation", "DistillReport"),
    "distill": ("selfspec.training.distillation", "distill"),
    "export": ("selfspec.training.exporter", "export"),
    "FeatureReport": ("selfspec.training.features", "FeatureReport"),
    "Sequence": ("selfspec.training.features", "Sequence"),
    "capture": ("selfspec.training.features", "capture"),
    "run": ("selfspec.training.pipeline", "run"),
    "save_drafter": ("selfspec.training.pipeline", "save_drafter"),
    "PRESETS": ("selfspec.training.presets", "PRESETS"),
    "Trainer": ("selfspec.training.trainer", "Trainer"),
    "TrainResult": ("selfspec.training.trainer", "TrainResult"),
    "measure_tau": ("selfspec.training.trainer", "measure_tau"),
    "load_features": ("selfspec.training.features", "load"),
}

__all__ = [  # the names of _HOME (a test keeps them equal)
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

if TYPE_CHECKING:  # for type checkers and IDEs: the same names, eagerly
    from selfspec.training.calibration import Calibration, calibrate, measure_acceptance
    from selfspec.training.config import (
        CalibrationConfig,
        DataConfig,
        DistillConfig,
        FeatureConfig,
        RunConfig,
        Settings,
        TrainConfig,
    )
    from selfspec.training.data import DataReport, Example, load_all, load_examples
    from selfspec.training.distillation import DistillReport, distill
    from selfspec.training.exporter import export
    from selfspec.training.features import FeatureReport, Sequence, capture
    from selfspec.training.features import load as load_features
    from selfspec.training.pipeline import run, save_drafter
    from selfspec.training.presets import PRESETS
    from selfspec.training.trainer import Trainer, TrainResult, measure_tau


def __getattr__(name: str) -> Any:
    if name not in _HOME:
        raise AttributeError(f"module 'selfspec.training' has no attribute {name!r}")
    module, attr = _HOME[name]
    value = getattr(importlib.import_module(module), attr)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_HOME))

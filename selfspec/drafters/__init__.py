"""Drafter kinds: Medusa-style parallel heads, the EAGLE-style feature-level drafter, its
EAGLE-3 layout (fused target layers) and the block drafter (EAGLE-3 inputs, every depth in one
forward)."""

from selfspec.drafters.base import (
    Draft,
    Drafter,
    DrafterConfig,
    SharedModules,
    TrainableBlock,
    TrainableHeads,
    TrainableStep,
)
from selfspec.drafters.block import BlockConfig, BlockDrafter
from selfspec.drafters.eagle import (
    Eagle3Config,
    Eagle3Drafter,
    EagleConfig,
    EagleDrafter,
    default_feature_layers,
)
from selfspec.drafters.medusa import MedusaConfig, MedusaDrafter
from selfspec.options import DRAFTER_KINDS

_CLASSES = {cls.kind: cls for cls in (MedusaDrafter, EagleDrafter, Eagle3Drafter, BlockDrafter)}
KINDS: dict[str, type[Drafter]] = {name: _CLASSES[name] for name in DRAFTER_KINDS}

__all__ = [
    "KINDS",
    "BlockConfig",
    "BlockDrafter",
    "Draft",
    "Drafter",
    "DrafterConfig",
    "Eagle3Config",
    "Eagle3Drafter",
    "EagleConfig",
    "EagleDrafter",
    "MedusaConfig",
    "MedusaDrafter",
    "SharedModules",
    "TrainableBlock",
    "TrainableHeads",
    "TrainableStep",
    "default_feature_layers",
]

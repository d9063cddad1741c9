"""Drafter kinds: Medusa-style parallel heads, the EAGLE-style feature-level drafter and its
EAGLE-3 layout (fused target layers)."""

from selfspec.drafters.base import Draft, Drafter, DrafterConfig, SharedModules
from selfspec.drafters.eagle import (
    Eagle3Config,
    Eagle3Drafter,
    EagleConfig,
    EagleDrafter,
    default_fuse_layers,
)
from selfspec.drafters.medusa import MedusaConfig, MedusaDrafter

KINDS: dict[str, type[Drafter]] = {cls.kind: cls for cls in (MedusaDrafter, EagleDrafter, Eagle3Drafter)}

__all__ = [
    "KINDS",
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
    "default_fuse_layers",
]

"""Drafter kinds: Medusa-style parallel heads and the EAGLE-style feature-level drafter."""

from selfspec.drafters.base import Draft, Drafter, DrafterConfig, SharedModules
from selfspec.drafters.eagle import EagleConfig, EagleDrafter
from selfspec.drafters.medusa import MedusaConfig, MedusaDrafter

KINDS: dict[str, type[Drafter]] = {cls.kind: cls for cls in (MedusaDrafter, EagleDrafter)}

__all__ = [
    "KINDS",
    "Draft",
    "Drafter",
    "DrafterConfig",
    "EagleConfig",
    "EagleDrafter",
    "MedusaConfig",
    "MedusaDrafter",
    "SharedModules",
]

"""Model adapters: one module per model family; the only place that knows attribute paths.

Every family implements the `ModelAdapter` contract (`protocol`); `find_adapter` and
`model_parts` (`registry`) are what the rest of the package asks.
"""

from __future__ import annotations

from .protocol import DecoderShape, ModelAdapter, ModelParts
from .registry import ADAPTERS, find_adapter, model_geometry, model_parts, supported_families

__all__ = [
    "ADAPTERS",
    "DecoderShape",
    "ModelAdapter",
    "ModelParts",
    "find_adapter",
    "model_geometry",
    "model_parts",
    "supported_families",
]

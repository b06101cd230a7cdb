"""Token-merging algorithms on plain tensors (no transformers, no nn.Module).

>>> import torch
>>> from pitome_mllm.merge import pitome
>>> x = torch.randn(2, 577, 1024)
>>> step = pitome(x, r=57, margin=0.45, class_token=True)
>>> step(x).shape
torch.Size([2, 520, 1024])
"""

from .budget import StepParams, apply_merge, decide_merge, merge_to_budget, merge_to_budget_with
from .energy import ENERGY_KINDS, energy_score, margin_for_layer
from .pitome import pitome
from .plan import REDUCE_MODES, Merge, identity_merge, source_matrix
from .reducers import REDUCERS, ReductionInputs, reduce_to_budget
from .tome import bipartite_soft_matching

__all__ = [
    "ENERGY_KINDS",
    "REDUCERS",
    "REDUCE_MODES",
    "Merge",
    "ReductionInputs",
    "StepParams",
    "apply_merge",
    "bipartite_soft_matching",
    "decide_merge",
    "energy_score",
    "identity_merge",
    "margin_for_layer",
    "merge_to_budget",
    "merge_to_budget_with",
    "pitome",
    "reduce_to_budget",
    "source_matrix",
]

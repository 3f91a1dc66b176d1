"""Algorithm library: outcome advantages, token shapers (A3PO, ...), policy losses, aggregation, rollout-mismatch
correction, and the resolved `Algorithm` that combines them. Pure torch.

Imports nothing from Megatron, so it can be used from any framework. See docs/algorithms.md.
"""

from .advantages import ADVANTAGE_FNS, AdvantageConfig, AdvantageOutput, group_centered, is_correct
from .aggregation import AGG_MODES, LossNormaliser, aggregate, global_normaliser
from .algorithm import Algorithm, compute_policy_loss
from .components import INPUTS, Bound, bind, component, declaration, settings_fields, settings_read
from .context import AlgoContext
from .correction import MODES as CORRECTION_MODES
from .correction import CorrectionOutput, RolloutCorrectionConfig, rollout_correction
from .losses import (KL_TYPES, POLICY_LOSSES, GSPOConfig, PolicyLossConfig, RegulariserConfig, add_regularisers,
                     kl_penalty)
from .registry import get_advantage_fn, get_component, get_policy_loss, get_shaper, names, register, shaper_phase
from .selection import k_from_ratio, select_k_smallest
from .shaping import (
    SHAPERS,
    A3POConfig,
    ForkTokensConfig,
    TokenWeightedConfig,
    a3po_selection,
    a3po_token_weights,
    a3po_weight,
    fork_token_weights,
    token_weighted_weights,
)

__all__ = [
    "ADVANTAGE_FNS", "AGG_MODES", "CORRECTION_MODES", "INPUTS", "KL_TYPES", "POLICY_LOSSES", "SHAPERS",
    "A3POConfig", "AdvantageConfig", "GSPOConfig", "AdvantageOutput", "AlgoContext", "Algorithm", "Bound",
    "CorrectionOutput",
    "ForkTokensConfig", "LossNormaliser", "PolicyLossConfig", "RegulariserConfig", "RolloutCorrectionConfig",
    "TokenWeightedConfig",
    "a3po_selection", "a3po_token_weights", "a3po_weight", "add_regularisers", "aggregate", "bind", "component",
    "compute_policy_loss", "declaration", "fork_token_weights", "get_advantage_fn", "get_component",
    "get_policy_loss", "get_shaper", "global_normaliser", "group_centered", "is_correct", "k_from_ratio",
    "kl_penalty", "names",
    "register", "rollout_correction", "select_k_smallest", "settings_fields", "settings_read", "shaper_phase",
    "token_weighted_weights",
]

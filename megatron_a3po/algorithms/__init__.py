"""Algorithm library: outcome advantages, token shapers (A3PO, ...), policy losses, aggregation. Pure torch.

Imports nothing from Megatron, so it can be used from any framework. See docs/algorithms.md.
"""

from .advantages import ADVANTAGE_FNS, AdvantageConfig, AdvantageOutput, group_centered
from .aggregation import AGG_MODES, LossNormaliser, aggregate, global_normaliser
from .context import AlgoContext
from .losses import POLICY_LOSSES, PolicyLossConfig, add_regularisers, compute_policy_loss, kl_penalty
from .registry import get_advantage_fn, get_policy_loss, get_shaper, names, register, shaper_phase
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
    "ADVANTAGE_FNS", "AGG_MODES", "POLICY_LOSSES", "SHAPERS",
    "A3POConfig", "AdvantageConfig", "AdvantageOutput", "AlgoContext", "ForkTokensConfig", "LossNormaliser",
    "PolicyLossConfig", "TokenWeightedConfig",
    "a3po_selection", "a3po_token_weights", "a3po_weight", "add_regularisers", "aggregate", "compute_policy_loss",
    "fork_token_weights", "get_advantage_fn", "get_policy_loss", "get_shaper", "global_normaliser", "group_centered",
    "k_from_ratio", "kl_penalty", "names", "register", "select_k_smallest", "shaper_phase", "token_weighted_weights",
]

"""The DeepSeek-V3 network (SPEC §1)."""

from .layers import MLP, RMSNorm
from .mla import MLA, LatentCache
from .moe import Gate, GroupedExperts, MoE, Routing, grouped_linear, route
from .transformer import Block, MTPModule, TrainOutput, Transformer

__all__ = ["Transformer", "TrainOutput", "Block", "MTPModule", "MLA", "LatentCache", "MoE", "Gate",
           "GroupedExperts", "Routing", "route", "grouped_linear", "RMSNorm", "MLP"]

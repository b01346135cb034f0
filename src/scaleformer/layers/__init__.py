"""nn.Modules built from ops: attention, retention, FFN, norms, positions, Multiway, the Block, the per-call Context."""

from scaleformer.layers.attention import (AttentionCore, DilatedSelfAttention, MomentumAttention, Projections,
                                          S2SelfAttention, SoftmaxAttention)
from scaleformer.layers.block import Block
from scaleformer.layers.context import Context
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.multiway import Multiway
from scaleformer.layers.norms import RMSNorm, make_norm
from scaleformer.layers.positions import LearnedPositions, RelativePositionBias, Rotary, sinusoidal_positions
from scaleformer.layers.scaling import ResidualScaling, residual_scaling

__all__ = ["AttentionCore", "Projections", "SoftmaxAttention", "MomentumAttention", "DilatedSelfAttention",
           "S2SelfAttention", "Block", "Context", "FeedForward", "Multiway", "RMSNorm", "make_norm",
           "LearnedPositions", "RelativePositionBias", "Rotary", "sinusoidal_positions", "ResidualScaling",
           "residual_scaling"]

"""nn.Modules built from ops: attention, FFN, norms, positions, Multiway, the Transformer block."""

from scaleformer.layers.attention import MultiheadAttention
from scaleformer.layers.block import BlockSpec, TransformerBlock
from scaleformer.layers.ffn import FeedForward
from scaleformer.layers.multiway import Multiway
from scaleformer.layers.norms import RMSNorm, make_norm
from scaleformer.layers.positions import LearnedPositions, RelativePositionBias, Rotary, sinusoidal_positions
from scaleformer.layers.scaling import ResidualScaling, residual_scaling

__all__ = ["MultiheadAttention", "BlockSpec", "TransformerBlock", "FeedForward", "Multiway", "RMSNorm", "make_norm",
           "LearnedPositions", "RelativePositionBias", "Rotary", "sinusoidal_positions", "ResidualScaling",
           "residual_scaling"]

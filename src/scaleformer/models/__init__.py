"""Models assembled from layers: the Transformer family (and, later, RetNet and LongNet)."""

from scaleformer.models.retnet import RetNet
from scaleformer.models.transformer import Decoder, Encoder, EncoderDecoder, ModelOutput

__all__ = ["Encoder", "Decoder", "EncoderDecoder", "RetNet", "ModelOutput"]

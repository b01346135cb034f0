"""Models assembled from layers: the Transformer family (LongNet is its dilated attention) and RetNet."""

from scaleformer.models.retnet import RetNet
from scaleformer.models.base import ModelOutput
from scaleformer.models.transformer import Decoder, Encoder, EncoderDecoder

__all__ = ["Encoder", "Decoder", "EncoderDecoder", "RetNet", "ModelOutput"]

"""Models assembled from layers: the Transformer family (LongNet is its dilated attention), RetNet and YOCO."""

from scaleformer.models.retnet import RetNet
from scaleformer.models.base import ModelOutput
from scaleformer.models.transformer import Decoder, Encoder, EncoderDecoder
from scaleformer.models.yoco import YOCO

__all__ = ["Encoder", "Decoder", "EncoderDecoder", "RetNet", "YOCO", "ModelOutput"]

"""Functional math with no module state. Each op has a pure-PyTorch reference beside its fast path."""

from scaleformer.ops.attention import attention, attention_reference
from scaleformer.ops.retention import retention, retention_reference

__all__ = ["attention", "attention_reference", "retention", "retention_reference"]

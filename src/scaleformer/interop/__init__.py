"""Interoperability with other tools: TorchScale checkpoints, Hugging Face transformers, lm-eval-harness.

Each submodule imports its tool lazily, so ``import scaleformer`` never needs them.
"""

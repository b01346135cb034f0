"""Interop tests run offline: Hugging Face libraries must never reach for the network (no hub, no datasets
downloads); set before transformers / datasets are first imported, since they read these at import."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

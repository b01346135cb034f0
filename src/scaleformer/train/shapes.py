"""``scaleformer train --task shapes``: BEiT-3's CPU demo. A tiny BEiT-3 learns, in one run, to classify
synthetic images of coloured shapes (16 classes) and to match them with their captions (retrieval), one
backbone under both heads, as BEiT-3 is fine-tuned (data: :mod:`scaleformer.data.shapes`).

Each step draws a fresh batch (a pure function of seed and step), runs the images once (the classification
head reads the mean of the patch tokens, the retrieval head the CLS token) and the captions once, and
minimises the classification cross-entropy plus the contrastive loss. Evaluation on a fixed held-out set:
classification accuracy and retrieval recall@1 in both directions, where a retrieved item counts when its
scene (shape, colour, size, side) is the query's, beside each figure's chance level.

The run directory gets ``classifier/`` and ``retrieval/`` (two ordinary model directories for
:func:`scaleformer.load`, sharing the backbone's weights), ``metrics.jsonl`` and ``result.json``, each
written atomically. It is a demo of a few minutes: it has no checkpoints to resume from.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from scaleformer import durable
from scaleformer.build import save
from scaleformer.data.shapes import WORDS, Shapes, make_shapes
from scaleformer.models.beit3 import BEiT3Config, BEiT3ForClassification, BEiT3ForRetrieval

__all__ = ["ShapesRun", "train_shapes", "evaluate_shapes", "SHAPES_MODEL"]

#: the demo's model: 4 layers of width 64 over 16 patches of 8 × 8 pixels and 8-word captions
SHAPES_MODEL = BEiT3Config(vocab_size=len(WORDS), embed_dim=64, layers=4, heads=4, ffn_dim=128, img_size=32,
                           patch_size=8, max_text_positions=16, num_classes=16)


@dataclass(frozen=True)
class ShapesRun:
    out: Path
    steps: int = 1000
    batch_size: int = 64
    lr: float = 2e-3
    warmup: int = 40
    weight_decay: float = 0.05
    seed: int = 0
    eval_every: int = 250
    eval_size: int = 512
    device: str = "cpu"
    progress: bool = True
    model: BEiT3Config = SHAPES_MODEL

    def __post_init__(self) -> None:
        for name in ("steps", "batch_size", "eval_every", "eval_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.batch_size < 2:
            raise ValueError("batch_size must be >= 2: the contrastive loss contrasts the pairs of a batch")
        if not self.lr > 0 or self.warmup < 0:
            raise ValueError(f"lr must be > 0 and warmup >= 0, got {self.lr} and {self.warmup}")


def _models(config: BEiT3Config, seed: int, device: torch.device) -> tuple[BEiT3ForClassification, BEiT3ForRetrieval]:
    torch.manual_seed(seed)
    classifier = BEiT3ForClassification(config.replace(task="classification")).to(device)
    retrieval = BEiT3ForRetrieval(config.replace(task="retrieval")).to(device)
    retrieval.beit3 = classifier.beit3  # one backbone, two heads
    return classifier, retrieval


def _losses(classifier: BEiT3ForClassification, retrieval: BEiT3ForRetrieval, batch: Shapes,
            device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    images, text_ids = batch.images.to(device), batch.text_ids.to(device)
    hidden = classifier.beit3(images=images).hidden  # once for both heads
    logits = classifier.head(classifier.fc_norm(hidden[:, 1:].mean(1)))
    classification = F.cross_entropy(logits, batch.labels.to(device))
    image = F.normalize(retrieval.vision_head(hidden[:, 0]), dim=-1)
    text = retrieval.embed_texts(text_ids)
    similarity = retrieval.logit_scale.exp() * image @ text.t()
    targets = torch.arange(len(batch.labels), device=device)
    contrastive = (F.cross_entropy(similarity, targets) + F.cross_entropy(similarity.t(), targets)) / 2
    return classification, contrastive


@torch.no_grad()
def evaluate_shapes(classifier: BEiT3ForClassification, retrieval: BEiT3ForRetrieval, data: Shapes,
                    device: torch.device, chunk: int = 256) -> dict[str, float]:
    """Accuracy and recall@1 (a hit: the retrieved item shows the query's scene), with chance levels."""
    classifier.eval()
    retrieval.eval()
    logits, images, texts = [], [], []
    for start in range(0, len(data.labels), chunk):
        part = data.images[start:start + chunk].to(device)
        hidden = classifier.beit3(images=part).hidden
        logits.append(classifier.head(classifier.fc_norm(hidden[:, 1:].mean(1))))
        images.append(F.normalize(retrieval.vision_head(hidden[:, 0]), dim=-1))
        texts.append(retrieval.embed_texts(data.text_ids[start:start + chunk].to(device)))
    scenes = data.scenes.to(device)
    similarity = torch.cat(images) @ torch.cat(texts).t()
    same = scenes[:, None] == scenes[None, :]  # (images, captions): a right match
    counts = same.float().sum(1)
    classifier.train()
    retrieval.train()
    return {"accuracy": float((torch.cat(logits).argmax(-1) == data.labels.to(device)).float().mean()),
            "accuracy_chance": 1 / data.classes,
            "image_to_text_r1": float(same.gather(1, similarity.argmax(1)[:, None]).float().mean()),
            "text_to_image_r1": float(same.t().gather(1, similarity.t().argmax(1)[:, None]).float().mean()),
            "retrieval_chance": float((counts / len(scenes)).mean())}


def train_shapes(run: ShapesRun) -> dict[str, Any]:
    """Train, evaluate every ``eval_every`` steps and at the end, save both models; returns result.json's data."""
    device = torch.device(run.device)
    classifier, retrieval = _models(run.model, run.seed, device)
    heads = [p for n, p in retrieval.named_parameters() if not n.startswith("beit3.")]
    parameters = list(classifier.parameters()) + heads
    decay = [p for p in parameters if p.dim() >= 2]
    no_decay = [p for p in parameters if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": run.weight_decay},
                                   {"params": no_decay, "weight_decay": 0.0}], lr=run.lr, betas=(0.9, 0.98))
    held_out = make_shapes(run.eval_size, img_size=run.model.img_size, seed=10_000_000 + run.seed)
    run.out.mkdir(parents=True, exist_ok=True)
    metrics_path = run.out / "metrics.jsonl"
    metrics_path.write_text("")
    history: list[dict[str, Any]] = []
    started = time.perf_counter()
    for step in range(run.steps):
        lr = run.lr * min(1.0, (step + 1) / max(run.warmup, 1)) if step < run.warmup else run.lr * 0.5 * (
            1 + math.cos(math.pi * (step - run.warmup) / max(run.steps - run.warmup, 1)))
        for group in optimizer.param_groups:
            group["lr"] = lr
        batch = make_shapes(run.batch_size, img_size=run.model.img_size, seed=run.seed * 1_000_003 + step)
        classification, contrastive = _losses(classifier, retrieval, batch, device)
        loss = classification + contrastive
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(parameters, 1.0)
        optimizer.step()
        if (step + 1) % run.eval_every == 0 or step + 1 == run.steps:
            row = {"step": step + 1, "classification_loss": classification.item(), "contrastive_loss": contrastive.item(),
                   "lr": lr, "seconds": time.perf_counter() - started,
                   **evaluate_shapes(classifier, retrieval, held_out, device)}
            history.append(row)
            with metrics_path.open("a") as handle:
                handle.write(json.dumps(row) + "\n")
            if run.progress:
                print(f"step {row['step']}: loss {loss.item():.3f}, accuracy {row['accuracy']:.3f} (chance "
                      f"{row['accuracy_chance']:.3f}), recall@1 image→text {row['image_to_text_r1']:.3f} text→image "
                      f"{row['text_to_image_r1']:.3f} (chance {row['retrieval_chance']:.3f})", flush=True)
    classifier.eval()
    retrieval.eval()
    save(classifier, run.out / "classifier")
    save(retrieval, run.out / "retrieval")
    result = {"task": "shapes", "steps": run.steps, "batch_size": run.batch_size, "seed": run.seed,
              "seconds": time.perf_counter() - started, "final": history[-1], "model": run.model.to_dict()}
    durable.atomic_write_text(run.out / "result.json", json.dumps(result, indent=1))
    return result

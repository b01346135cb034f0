"""lm-eval-harness adapter: evaluate a scaleformer checkpoint with ``lm_eval`` (>= 0.4), offline.

Importing this module registers the model name ``"scaleformer"``::

    lm_eval --model scaleformer --model_args pretrained=runs/default --tasks my_task --include_path tasks/

or from Python, ``lm_eval.simple_evaluate(model=ScaleformerLM("runs/default"), tasks=[...])``.

``pretrained`` is a checkpoint directory, a training run directory (its latest checkpoint) or a
``scaleformer.save`` directory; it must hold the tokenizer the model was trained with (training
checkpoints do). Decoders and RetNets are supported (causal scoring).

Scoring runs on our models directly: requests are sorted by length, left-padded into batches (our
models give padded rows exactly the logits of the unpadded ones), and each continuation's log-probability
is summed from a log-softmax in float32. Rolling log-likelihoods use lm_eval's own disjoint windows of
``max_length`` tokens; generation is greedy through :func:`scaleformer.generate`.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F

try:
    import lm_eval.utils as lm_utils
    from lm_eval.api.model import TemplateLM
    from lm_eval.api.registry import register_model
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("scaleformer.lmeval needs lm-eval-harness: pip install 'scaleformer[lm-eval]'") from error

from scaleformer.build import load
from scaleformer.config import ConfigBase
from scaleformer.models.architecture import EncoderDecoderConfig, LearnedPosition
from scaleformer.models.families import arch_of, model_config
from scaleformer.generation import generate

__all__ = ["ScaleformerLM"]


@register_model("scaleformer")
class ScaleformerLM(TemplateLM):
    """A scaleformer causal LM (Decoder or RetNet) with its tokenizer, as an lm_eval model."""

    def __init__(self, pretrained: str, batch_size: int | str = 8, max_length: int | str | None = None,
                 device: str | None = None, dtype: str = "float32", **kwargs: Any) -> None:
        super().__init__()
        from scaleformer.data.tokenizer import load_tokenizer
        from scaleformer.train.checkpoint import resolve_checkpoint

        device = self._available(device)
        path = resolve_checkpoint(pretrained)
        self.model = load(path, map_location=device).to(getattr(torch, dtype)).eval()
        config = self.model.config
        if arch_of(config) != "decoder":
            raise ValueError(f"lm_eval scores causal language models; {path} holds an {arch_of(config).replace('_', '-')}")
        self.tokenizer = load_tokenizer(path)
        self._device = torch.device(device)
        self.batch_size = int(batch_size)
        self.max_length = int(max_length) if max_length is not None else self._default_max_length(config)

    @staticmethod
    def _available(device: str | None) -> str:
        """lm_eval's CLI asks for cuda:0 unless told otherwise; without CUDA that means the CPU."""
        if device is None or (device.startswith("cuda") and not torch.cuda.is_available()):
            if device is not None:
                warnings.warn(f"device {device!r} is not available here; evaluating on the CPU", stacklevel=3)
            return "cuda" if torch.cuda.is_available() and device is None else "cpu"
        return device

    @staticmethod
    def _default_max_length(config: ConfigBase) -> int:
        made = model_config(config)
        stack = made.decoder if isinstance(made, EncoderDecoderConfig) else made
        if isinstance(stack.position, LearnedPosition):
            return stack.position.max_positions  # the learned table ends there
        return 2048

    @property
    def eot_token_id(self) -> int:
        return self.tokenizer.eos_id

    @property
    def prefix_token_id(self) -> int:
        return self.tokenizer.bos_id  # our models see <bos> at the start of every training document

    def tok_encode(self, string: str, add_special_tokens: bool | None = None, **kwargs: Any) -> list[int]:
        return self.tokenizer.encode(string)

    def tok_decode(self, tokens: list[int]) -> str:
        return self.tokenizer.decode(tokens)

    # ------------------------------------------------------------------------------------------------
    # scoring
    # ------------------------------------------------------------------------------------------------
    def _loglikelihood_tokens(self, requests: list, disable_tqdm: bool = False, **kwargs: Any) -> list[tuple[float, bool]]:
        """(key, context ids, continuation ids) -> (Σ log p(continuation | context), continuation is greedy)."""
        results: list[tuple[float, bool] | None] = [None] * len(requests)
        # Longest first: the first batch is the largest (an OOM shows at once); similar lengths pad little.
        order = sorted(range(len(requests)), key=lambda i: -len(requests[i][1]) - len(requests[i][2]))
        for start in range(0, len(order), self.batch_size):
            batch = order[start:start + self.batch_size]
            rows = []
            for index in batch:
                _, context, continuation = requests[index]
                if not continuation:
                    raise ValueError("lm_eval request with an empty continuation")
                whole = (list(context) + list(continuation))[-(self.max_length + 1):]
                rows.append((whole[:-1], continuation))
            for index, result in zip(batch, self._score(rows)):
                results[index] = result
                self.cache_hook.add_partial("loglikelihood", requests[index][0], result)
        return results  # type: ignore[return-value]

    @torch.no_grad()
    def _score(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[float, bool]]:
        width = max(len(inputs) for inputs, _ in rows)
        ids = torch.zeros(len(rows), width, dtype=torch.long)
        mask = torch.zeros(len(rows), width, dtype=torch.long)
        for r, (inputs, _) in enumerate(rows):  # left padding: every row ends at the last column
            ids[r, width - len(inputs):] = torch.tensor(inputs)
            mask[r, width - len(inputs):] = 1
        logits = self.model(ids.to(self._device), attention_mask=mask.to(self._device)).logits
        out = []
        for r, (_, continuation) in enumerate(rows):
            target = torch.tensor(continuation, device=self._device)
            logprobs = F.log_softmax(logits[r, -len(continuation):].float(), dim=-1)  # (n, V)
            total = logprobs.gather(-1, target[:, None]).sum().item()
            out.append((total, bool((logprobs.argmax(-1) == target).all())))
        return out

    def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
        totals = []
        for request in requests:
            (text,) = request.args
            windows = [(None, *window) for window in map(lm_utils.make_disjoint_window, lm_utils.get_rolling_token_windows(
                token_list=self.tok_encode(text), prefix_token=self.prefix_token_id,
                max_seq_len=self.max_length, context_len=1))]
            total = sum(score for score, _ in self._loglikelihood_tokens(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", (text,), total)
            totals.append(total)
        return totals

    # ------------------------------------------------------------------------------------------------
    # generation
    # ------------------------------------------------------------------------------------------------
    def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            gen_kwargs = dict(gen_kwargs or {})
            until = gen_kwargs.pop("until", None) or [self.tokenizer.decode([self.eot_token_id])]
            until = [until] if isinstance(until, str) else list(until)
            max_new = int(gen_kwargs.pop("max_gen_toks", 256))
            if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0) or 0.0) > 0:
                raise ValueError("scaleformer's lm_eval adapter generates greedily; set do_sample=False")
            prompt = [self.prefix_token_id, *self.tok_encode(context)][-max(self.max_length - max_new, 1):]
            ids = torch.tensor([prompt], device=self._device)
            with torch.no_grad():
                new = generate(self.model, ids, max_new, stop_tokens=[self.eot_token_id])[0, len(prompt):]
            tokens = [int(t) for t in new]
            if self.eot_token_id in tokens:  # what follows the stop token is padding
                tokens = tokens[:tokens.index(self.eot_token_id)]
            text = self.tok_decode(tokens)
            for stop in until:
                if stop and stop in text:
                    text = text[:text.index(stop)]
            self.cache_hook.add_partial("generate_until", (context, request.args[1]), text)
            outputs.append(text)
        return outputs

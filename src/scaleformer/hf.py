"""Hugging Face ``transformers`` (>= 5) integration: our models behind ``AutoModelForCausalLM``.

Importing this module registers the ``"scaleformer"`` model type with ``AutoConfig``,
``AutoModelForCausalLM`` (Decoder and RetNet configs), ``AutoModelForSeq2SeqLM`` (EncoderDecoder configs)
and ``AutoModelForMaskedLM`` (Encoder configs)::

    import scaleformer.hf
    model = AutoModelForCausalLM.from_pretrained("exported/")        # offline, from a local directory
    model.generate(ids, max_new_tokens=20, do_sample=False)          # greedy: = scaleformer.generate

How the pieces meet:

* :class:`ScaleformerConfig` holds our own config as a dict (``config.scaleformer``, with its family), so
  every option round-trips through ``config.json`` and is validated when the model is built.
* The wrapped model sits at ``.model``; its weights are saved under ``model.`` by ``save_pretrained``.
* ``generate()`` runs on *our* caches: :class:`~scaleformer.cache.TransformerCache` (KV cache) for a
  Decoder and :class:`~scaleformer.cache.RetentionCache` (the O(1) recurrent state) for a RetNet. They
  travel as ``past_key_values``; ``prepare_inputs_for_generation`` feeds only the tokens the cache has
  not seen, and beam search reorders them through ``_reorder_cache``. The attention mask HF passes
  covers cached + new tokens, which our models accept, so left-padded batches work.
* :func:`export_hf` writes a trained checkpoint (and its tokenizer) as a ``save_pretrained`` directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import Tensor, nn

try:
    from transformers import (AutoConfig, AutoModelForCausalLM, AutoModelForMaskedLM, AutoModelForSeq2SeqLM,
                              GenerationMixin, PretrainedConfig, PreTrainedModel, PreTrainedTokenizerFast)
    from transformers.modeling_outputs import BaseModelOutput, CausalLMOutputWithPast, MaskedLMOutput, Seq2SeqLMOutput
except ImportError as error:  # pragma: no cover - exercised only without the extra
    raise ImportError("scaleformer.hf needs Hugging Face transformers 5: pip install 'scaleformer[hf]'") from error

from scaleformer import durable
from scaleformer.build import FORMAT, build, load, load_weights, require_language_model
from scaleformer.cache import RetentionCache, TransformerCache
from scaleformer.config import ConfigBase, RetNetConfig, TransformerConfig, config_from_dict
from scaleformer.models.architecture import EncoderDecoderConfig, ModelConfig
from scaleformer.models.families import arch_of, model_config
from scaleformer.files import one_line, read_json_object

def _cache_field(output_class: type) -> str:
    """The name under which this transformers version's output classes carry the cache."""
    return "cache" if "cache" in getattr(output_class, "__dataclass_fields__", {}) else "past_key_values"


def _given_cache(past_key_values: Any, kwargs: dict[str, Any]) -> Any:
    """The cache transformers passed, under its old name (``past_key_values``) or its new one (``cache``)."""
    cache = kwargs.pop("cache", None)
    if cache is not None and past_key_values is not None and cache is not past_key_values:
        raise ValueError("pass the cache once, as `cache` or as `past_key_values`")
    return cache if cache is not None else past_key_values


__all__ = ["ScaleformerConfig", "ScaleformerForCausalLM", "ScaleformerForMaskedLM", "ScaleformerForSeq2SeqLM",
           "wrap", "export_hf", "hf_tokenizer"]

MODEL_TYPE = "scaleformer"


class ScaleformerConfig(PretrainedConfig):
    """A ``transformers`` config wrapping a scaleformer config (``scaleformer``: its ``to_dict()``)."""

    model_type = MODEL_TYPE

    def __init__(self, scaleformer: dict[str, Any] | None = None, **kwargs: Any) -> None:
        self.scaleformer = dict(scaleformer) if scaleformer is not None else {}
        if self.scaleformer:
            ours = self.ours()
            made = model_config(ours)
            first = made.encoder if isinstance(made, EncoderDecoderConfig) else made  # HF counts the encoder's
            layers, heads = len(first.layers), getattr(first.layers[0].mixer, "heads", 1)
            kwargs.setdefault("vocab_size", ours.vocab_size)
            kwargs.setdefault("hidden_size", ours.embed_dim)
            kwargs.setdefault("num_hidden_layers", layers)
            kwargs.setdefault("num_attention_heads", heads)
            kwargs.setdefault("tie_word_embeddings", ours.tie_embeddings)
            kwargs.setdefault("is_encoder_decoder", arch_of(ours) == "encoder_decoder")
        super().__init__(**kwargs)

    @classmethod
    def from_scaleformer(cls, config: ConfigBase, **kwargs: Any) -> "ScaleformerConfig":
        return cls(scaleformer=config.to_dict(), **kwargs)

    def ours(self) -> TransformerConfig | RetNetConfig | ModelConfig:
        return config_from_dict(self.scaleformer, saved=True)  # type: ignore[return-value]


class _ScaleformerPreTrained(PreTrainedModel):
    config_class = ScaleformerConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    supports_gradient_checkpointing = False

    def __init__(self, config: ScaleformerConfig) -> None:
        super().__init__(config)
        self.model = build(config.ours())
        self._declare_shared_parameters()
        self.post_init()

    def _declare_shared_parameters(self) -> None:
        """Our stacks register the token embedding under several names (one tensor); tell ``transformers``
        which names are aliases, so it saves the tensor once and re-links the aliases on load."""
        first: dict[int, str] = {}
        aliases: dict[str, str] = {}
        for name, param in self.named_parameters(remove_duplicate=False):
            source = first.setdefault(id(param), name)
            if source != name:
                aliases[name] = source
        self._tied_weights_keys = aliases

    def get_expanded_tied_weights_keys(self, all_submodels: bool = False) -> dict:
        # Structural aliases, whatever `tie_word_embeddings` says (that flag describes the output head).
        return dict(self._tied_weights_keys)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """``transformers``' save, plus a two-line module and an ``auto_map`` so that the directory also
        loads with ``trust_remote_code=True`` in a process that never imported ``scaleformer.hf``
        (e.g. ``lm_eval --model hf``); the module only imports these classes from the installed package."""
        self.config.scaleformer_format = FORMAT  # the parameter names' layout (see scaleformer.build.MIGRATIONS)
        self.config.auto_map = {"AutoConfig": f"{_SHIM}.ScaleformerConfig",
                                **{auto: f"{_SHIM}.{cls.__name__}" for auto, cls in _AUTO_CLASSES.items()
                                   if isinstance(self, cls)}}
        super().save_pretrained(save_directory, *args, **kwargs)
        Path(save_directory, f"{_SHIM}.py").write_text(
            '"""Loads scaleformer models through transformers\' remote-code path; needs `pip install scaleformer`."""\n'
            "from scaleformer.hf import (ScaleformerConfig, ScaleformerForCausalLM, ScaleformerForMaskedLM,  # noqa: F401\n"
            "                            ScaleformerForSeq2SeqLM)\n")

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path: str | os.PathLike, *args: Any, **kwargs: Any):
        """A local directory (our exports, any format) is loaded with every check ``scaleformer.load`` makes
        (:func:`_load_local`): one ``ValueError`` naming the file for a bad format, config, header or value,
        before anything large is allocated. Anything else goes to ``transformers``' loader."""
        directory = Path(pretrained_model_name_or_path) / (kwargs.get("subfolder") or "")
        if (directory / "config.json").is_file():
            return _load_local(cls, directory, args, kwargs)
        return super().from_pretrained(pretrained_model_name_or_path, *args, **kwargs)

    def _init_weights(self, module: nn.Module) -> None:
        """Our modules initialise themselves when built; nothing for ``transformers`` to overwrite."""

    def get_input_embeddings(self) -> nn.Module:
        return self.model.embed_tokens

    def set_input_embeddings(self, value: nn.Module) -> None:  # pragma: no cover - not used by our models
        raise NotImplementedError("scaleformer models share their embedding module between stacks; resize the "
                                  "scaleformer config's vocab_size and convert instead")


# from_pretrained options that mean nothing for a local directory (where to download from, whether to run
# remote code: our classes are the code), and those with the one value a local load honours.
_NO_OP_WHEN_LOCAL = {"local_files_only", "trust_remote_code", "_from_auto", "_from_pipeline", "_commit_hash",
                     "cache_dir", "force_download", "proxies", "token", "low_cpu_mem_usage", "code_revision",
                     "subfolder"}
_ONLY_VALUE_WHEN_LOCAL = {"revision": ("main",), "use_safetensors": (True,), "device_map": ("cpu",),
                          "output_loading_info": (False,)}  # other options are honoured when None (not given)


def _load_local(cls: type, directory: Path, args: tuple, kwargs: dict[str, Any]) -> "_ScaleformerPreTrained":
    """A ``save_pretrained`` directory of ours, checked as ``scaleformer.load`` checks a model directory:
    the config (bounded JSON; ``scaleformer_format`` an integer this version reads; a valid scaleformer
    config), the weight files (``model.safetensors``, or the shards its index names, nothing else), their
    headers against the model the config builds (names, shapes, one floating dtype; before building it),
    and the values (finite). The model comes back in the dtype it was saved in, or ``dtype``/``torch_dtype``."""
    from scaleformer.build import MAX_CONFIG_BYTES, check_finite, check_header, read_header

    if args:
        raise ValueError(f"{cls.__name__}.from_pretrained({directory}): positional model arguments are not taken")
    dtype = kwargs.pop("dtype", None) or kwargs.pop("torch_dtype", None)
    given = kwargs.pop("config", None)
    for key, value in kwargs.items():
        if value is not None and key not in _NO_OP_WHEN_LOCAL and value not in _ONLY_VALUE_WHEN_LOCAL.get(key, ()):
            raise ValueError(f"{cls.__name__}.from_pretrained({directory}): {key}={value!r} is not supported for a "
                             "local scaleformer export")
    config_file = directory / "config.json"
    data = read_json_object(config_file, "a Hugging Face config", MAX_CONFIG_BYTES)
    written = data.get("scaleformer_format", 1)  # exports before the field was written are format 1
    if type(written) is not int or not 1 <= written <= FORMAT:
        raise ValueError(f"{config_file}: scaleformer_format {one_line(repr(written), 20)}, but this scaleformer "
                         f"reads formats 1 to {FORMAT}" + (": upgrade scaleformer to load it"
                                                             if type(written) is int and written > FORMAT else ""))
    if not isinstance(data.get("scaleformer"), dict):
        raise ValueError(f"{config_file}: not a scaleformer export (no \"scaleformer\" object)")
    try:
        ours = config_from_dict(data["scaleformer"], saved=True)
        hf_config = ScaleformerConfig.from_dict({**data, "scaleformer": ours.to_dict()})
    except (ValueError, TypeError, KeyError, RecursionError) as error:
        raise ValueError(f"{config_file}: {one_line(error)}") from None
    if given is not None and getattr(given, "scaleformer", None) != data["scaleformer"]:
        raise ValueError(f"{cls.__name__}.from_pretrained({directory}): config= differs from {config_file}; edit the "
                         "file, or load the model and change it")
    files = _weight_files(directory)
    header: dict[str, tuple[str, tuple[int, ...]]] = {}
    for path in files:
        names, _ = read_header(path)
        for name, value in names.items():
            if not name.startswith("model.") or name.removeprefix("model.") in header:
                raise ValueError(f"{path}: holds {one_line(name, 80)!r}, which is not a scaleformer weight or is "
                                 "stored twice")
            header[name.removeprefix("model.")] = value
    saved_dtype = check_header(header, written, ours, files[0])
    wrapper = cls(hf_config)
    stored: dict[str, Tensor] = {}
    for path in files:
        try:
            stored.update({name.removeprefix("model."): tensor for name, tensor in load_file(path).items()})
        except Exception as error:  # noqa: BLE001 - safetensors' own error type, or I/O
            raise ValueError(f"{path}: unreadable weights ({one_line(error)})") from None
    wrapper.model.to(saved_dtype)
    load_weights(wrapper.model, stored, written)
    check_finite(wrapper.model, files[0])
    if dtype not in (None, "auto"):
        wrapper.model.to(getattr(torch, dtype) if isinstance(dtype, str) else dtype)
    return wrapper.eval()


def _weight_files(directory: Path) -> list[Path]:
    """``model.safetensors``, or the shards ``model.safetensors.index.json`` names; any other
    ``*.safetensors`` beside them is refused (its tensors would otherwise be silently left out or mixed in)."""
    index = directory / "model.safetensors.index.json"
    if index.is_file():
        weight_map = read_json_object(index, "a weight index", 16 << 20).get("weight_map")
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) and "/" not in v for v in weight_map.values()):
            raise ValueError(f"{index}: its weight_map is not an object of file names")
        expected = sorted(set(weight_map.values()))
    else:
        expected = ["model.safetensors"]
    found = sorted(path.name for path in directory.glob("*.safetensors"))
    if found != expected:
        extra, missing = sorted(set(found) - set(expected)), sorted(set(expected) - set(found))
        raise ValueError(f"{directory}: " + "; ".join(filter(None, [
            missing and f"lacks {', '.join(missing[:3])}",
            extra and f"holds weight files the export does not name ({', '.join(extra[:3])}); remove them"])))
    return [directory / name for name in expected]


class ScaleformerForCausalLM(_ScaleformerPreTrained, GenerationMixin):
    """A scaleformer Decoder or RetNet as a ``transformers`` causal LM."""

    def __init__(self, config: ScaleformerConfig) -> None:
        ours = config.ours()
        if arch_of(ours) != "decoder":
            raise ValueError(f"AutoModelForCausalLM needs a decoder; this config has arch={arch_of(ours)!r} "
                             f"(an encoder loads with AutoModelForMaskedLM, an encoder-decoder with "
                             f"AutoModelForSeq2SeqLM)")
        super().__init__(config)

    @property
    def _is_stateful(self) -> bool:
        """A fixed-size state (retention, a recurrence) cannot be rolled back, which assisted decoding needs;
        nor can a cache that forgets slots outside a window (YOCO's sliding-window self-decoder)."""
        cache = self.model.new_cache()
        return bool(cache.stages) or any(state is not None and not state.holds_keys for state in cache.layers)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False  # we bring our own caches (see prepare_inputs_for_generation)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None,
                past_key_values: TransformerCache | RetentionCache | None = None, use_cache: bool | None = None,
                labels: Tensor | None = None, logits_to_keep: int = 0, **kwargs: Any) -> CausalLMOutputWithPast:
        """Logits (B, T, V) (of the last ``logits_to_keep`` tokens when > 0, as ``generate`` asks); with
        ``labels`` also the next-token loss (label -100 is ignored). The cache may come as ``past_key_values``
        or ``cache``."""
        past_key_values = _given_cache(past_key_values, kwargs)
        if past_key_values is not None and not isinstance(past_key_values, (TransformerCache, RetentionCache)):
            raise TypeError(f"the cache must be the one this model returned, got {type(past_key_values).__name__}")
        if labels is not None and logits_to_keep:
            raise ValueError("labels need the logits of every position: leave logits_to_keep at 0")
        out = self.model(input_ids, attention_mask=attention_mask, cache=past_key_values,
                         use_cache=bool(use_cache) or past_key_values is not None, logits_to_keep=logits_to_keep)
        loss = None
        if labels is not None:
            logits = out.logits[:, :-1].float()
            loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1), ignore_index=-100)
        return CausalLMOutputWithPast(loss=loss, logits=out.logits, **{_CAUSAL_CACHE: out.cache})

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Any = None,
                                      attention_mask: Tensor | None = None, use_cache: bool = True,
                                      **kwargs: Any) -> dict[str, Any]:
        cache = _given_cache(past_key_values, kwargs)
        seen = cache.length if cache is not None else 0
        return {"input_ids": input_ids[:, seen:], "past_key_values": cache, "attention_mask": attention_mask,
                "use_cache": use_cache, "logits_to_keep": kwargs.get("logits_to_keep", 0)}

    def _reorder_cache(self, past_key_values: TransformerCache | RetentionCache, beam_idx: Tensor):
        past_key_values.reorder(beam_idx)
        return past_key_values


class ScaleformerForMaskedLM(_ScaleformerPreTrained):
    """A scaleformer Encoder as a ``transformers`` masked LM (token logits at every position)."""

    def __init__(self, config: ScaleformerConfig) -> None:
        ours = config.ours()
        if arch_of(ours) != "encoder":
            raise ValueError("AutoModelForMaskedLM needs an encoder config (arch='encoder')")
        super().__init__(config)

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, labels: Tensor | None = None,
                **kwargs: Any) -> MaskedLMOutput:
        out = self.model(input_ids, attention_mask=attention_mask)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100)
        return MaskedLMOutput(loss=loss, logits=out.logits, hidden_states=None)


class _EncoderView(nn.Module):
    """What ``generate`` calls to encode the source once: our encoder, returning a ``BaseModelOutput``."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.__dict__["_model"] = model  # not a registered submodule: its weights are the wrapper's

    def forward(self, input_ids: Tensor, attention_mask: Tensor | None = None, **kwargs: Any) -> BaseModelOutput:
        return BaseModelOutput(last_hidden_state=self._model.encode(input_ids, attention_mask))


class ScaleformerForSeq2SeqLM(_ScaleformerPreTrained, GenerationMixin):
    """A scaleformer EncoderDecoder as a ``transformers`` sequence-to-sequence LM.

    ``generate(src_ids, decoder_start_token_id=...)`` encodes the source once, then decodes with our
    TransformerCache (which also keeps the projected cross-attention keys and values).
    """

    def __init__(self, config: ScaleformerConfig) -> None:
        ours = config.ours()
        if arch_of(ours) != "encoder_decoder":
            raise ValueError("AutoModelForSeq2SeqLM needs an encoder-decoder config (EncoderDecoderConfig)")
        super().__init__(config)

    @classmethod
    def _supports_default_dynamic_cache(cls) -> bool:
        return False

    def get_encoder(self, modality: str | None = None) -> nn.Module:
        return _EncoderView(self.model)

    def forward(self, input_ids: Tensor | None = None, attention_mask: Tensor | None = None,
                decoder_input_ids: Tensor | None = None, decoder_attention_mask: Tensor | None = None,
                encoder_outputs: Any = None, past_key_values: TransformerCache | None = None,
                use_cache: bool | None = None, labels: Tensor | None = None, **kwargs: Any) -> Seq2SeqLMOutput:
        """Logits (B, T, V) for the target; with ``labels`` (and no decoder ids) the decoder input is the
        labels shifted right behind ``config.decoder_start_token_id``, and the loss is their cross-entropy.
        The cache may come as ``past_key_values`` or ``cache``."""
        past_key_values = _given_cache(past_key_values, kwargs)
        if past_key_values is not None and not isinstance(past_key_values, TransformerCache):
            raise TypeError(f"the cache must be the one this model returned, got {type(past_key_values).__name__}")
        if decoder_input_ids is None:
            if labels is None:
                raise ValueError("pass decoder_input_ids (or labels)")
            start = self.config.decoder_start_token_id
            if start is None:
                raise ValueError("labels without decoder_input_ids need config.decoder_start_token_id")
            decoder_input_ids = torch.cat([labels.new_full((labels.shape[0], 1), start), labels[:, :-1]], 1)
            decoder_input_ids = decoder_input_ids.masked_fill(decoder_input_ids == -100, self.config.pad_token_id or 0)
        cache = past_key_values if past_key_values is not None else self.model.new_cache()
        if cache.encoder_hidden is None:
            if encoder_outputs is None:
                if input_ids is None:
                    raise ValueError("pass input_ids (the source) or encoder_outputs")
                hidden = self.model.encode(input_ids, attention_mask)
            else:
                hidden = encoder_outputs[0] if isinstance(encoder_outputs, (tuple, list)) else encoder_outputs.last_hidden_state
            mask = attention_mask if attention_mask is not None else torch.ones(hidden.shape[:2], device=hidden.device)
            cache.encoder_hidden, cache.encoder_mask = hidden, mask.bool()
        out = self.model(None, decoder_input_ids, tgt_mask=decoder_attention_mask, cache=cache)
        loss = None
        if labels is not None:
            loss = F.cross_entropy(out.logits.float().reshape(-1, out.logits.shape[-1]), labels.reshape(-1),
                                   ignore_index=-100)
        return Seq2SeqLMOutput(loss=loss, logits=out.logits, **{_SEQ2SEQ_CACHE: cache if use_cache else None})

    def prepare_inputs_for_generation(self, input_ids: Tensor, past_key_values: Any = None,
                                      attention_mask: Tensor | None = None, encoder_outputs: Any = None,
                                      use_cache: bool = True, **kwargs: Any) -> dict[str, Any]:
        cache = _given_cache(past_key_values, kwargs)
        seen = cache.length if cache is not None else 0
        return {"decoder_input_ids": input_ids[:, seen:], "past_key_values": cache,
                "attention_mask": attention_mask, "encoder_outputs": encoder_outputs, "use_cache": use_cache,
                "decoder_attention_mask": kwargs.get("decoder_attention_mask")}

    def _reorder_cache(self, past_key_values: TransformerCache, beam_idx: Tensor) -> TransformerCache:
        past_key_values.reorder(beam_idx)
        return past_key_values


def wrap(model: nn.Module, **config_kwargs: Any) -> ScaleformerForCausalLM | ScaleformerForMaskedLM | ScaleformerForSeq2SeqLM:
    """The ``transformers`` wrapper of an existing scaleformer model, sharing its weights."""
    config = ScaleformerConfig.from_scaleformer(model.config, **config_kwargs)
    cls = {"encoder": ScaleformerForMaskedLM, "encoder_decoder": ScaleformerForSeq2SeqLM}.get(arch_of(model.config),
                                                                                          ScaleformerForCausalLM)
    wrapper = cls(config)
    wrapper.model = model
    wrapper._declare_shared_parameters()
    wrapper.all_tied_weights_keys = wrapper.get_expanded_tied_weights_keys()
    return wrapper.eval() if not model.training else wrapper


def hf_tokenizer(tokenizer: Any) -> PreTrainedTokenizerFast:
    """Our tokenizer (byte or BPE) as a ``PreTrainedTokenizerFast`` giving the same ids."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    from scaleformer.data.tokenizer import BPETokenizer, ByteTokenizer

    if isinstance(tokenizer, BPETokenizer):
        return PreTrainedTokenizerFast(tokenizer_object=tokenizer._tok, bos_token="<bos>", eos_token="<eos>")
    if isinstance(tokenizer, ByteTokenizer):
        # Byte b is the byte-level alphabet's character for b; with no merges, BPE maps it to id b.
        alphabet = _byte_alphabet()
        vocab = {alphabet[b]: b for b in range(256)}
        backend = Tokenizer(models.BPE(vocab=vocab, merges=[]))
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
        backend.decoder = decoders.ByteLevel()
        fast = PreTrainedTokenizerFast(tokenizer_object=backend)
        fast.add_special_tokens({"bos_token": "<bos>", "eos_token": "<eos>", "pad_token": "<pad>"})
        assert (fast.bos_token_id, fast.eos_token_id, fast.pad_token_id) == (256, 257, 258)
        return fast
    raise ValueError(f"{type(tokenizer).__name__} has no Hugging Face equivalent (pre-tokenized ids need none)")


def _byte_alphabet() -> dict[int, str]:
    """GPT-2's byte -> printable character table (the byte-level pre-tokenizer's alphabet)."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    table, extra = {}, 0
    for b in range(256):
        if b in printable:
            table[b] = chr(b)
        else:
            table[b] = chr(256 + extra)
            extra += 1
    return table


def export_hf(source: str | os.PathLike, out: str | os.PathLike) -> Path:
    """Write a scaleformer checkpoint (a ``scaleformer.save`` directory, a training checkpoint or a run
    directory) as a ``save_pretrained`` directory, with its tokenizer when it has one."""
    from scaleformer.data.tokenizer import load_tokenizer
    from scaleformer.train.checkpoint import resolve_checkpoint

    path = resolve_checkpoint(source)
    model = load(path).eval()
    require_language_model(model.config, "export-hf")
    tokenizer = load_tokenizer(path) if (path / "tokenizer.json").is_file() else None
    if tokenizer is None and (path / "trainer.json").is_file():  # a training checkpoint always has one
        raise FileNotFoundError(f"{path / 'tokenizer.json'} not found: this training checkpoint lost its tokenizer, "
                                "and an export without it could not turn ids into text")
    extra: dict[str, Any] = {}
    if tokenizer is not None and hasattr(tokenizer, "eos_id"):
        extra = dict(bos_token_id=tokenizer.bos_id, eos_token_id=tokenizer.eos_id)
    wrapper = wrap(model, **extra)
    out = durable.check_output_dir(out, "export-hf", path)
    if out.is_dir() and any(out.iterdir()) and not (out / "config.json").is_file():
        raise ValueError(f"{out} holds other files; export into a new or empty directory (an earlier export is "
                         "replaced)")
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = durable.temporary_name(out)  # built complete beside ``out``, then put in place in one step
    try:
        wrapper.save_pretrained(tmp)
        if tokenizer is not None:
            try:
                hf_tokenizer(tokenizer).save_pretrained(tmp)
            except ValueError:
                pass  # pre-tokenized ids: nothing to export
        # the checkpoint's name, not its absolute path: an export is shared, the layout of one's disk is not
        (tmp / "scaleformer_source.json").write_text(json.dumps({"exported_from": path.name}))
        durable.fsync_tree(tmp)
    except Exception:
        durable.remove_tree(tmp)
        raise
    durable.install_dir(tmp, out)
    return out


_SHIM = "scaleformer_hf"
_CAUSAL_CACHE, _SEQ2SEQ_CACHE = _cache_field(CausalLMOutputWithPast), _cache_field(Seq2SeqLMOutput)
_AUTO_CLASSES = {"AutoModelForCausalLM": ScaleformerForCausalLM, "AutoModelForMaskedLM": ScaleformerForMaskedLM,
                 "AutoModelForSeq2SeqLM": ScaleformerForSeq2SeqLM}


def _register() -> None:
    AutoConfig.register(MODEL_TYPE, ScaleformerConfig, exist_ok=True)
    AutoModelForCausalLM.register(ScaleformerConfig, ScaleformerForCausalLM, exist_ok=True)
    AutoModelForMaskedLM.register(ScaleformerConfig, ScaleformerForMaskedLM, exist_ok=True)
    AutoModelForSeq2SeqLM.register(ScaleformerConfig, ScaleformerForSeq2SeqLM, exist_ok=True)


_register()

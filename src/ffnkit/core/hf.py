"""What ffnkit needs to know about transformers itself: the auto class of a config, the text config of
multimodal models, and quieting transformers' own progress bars while a model loads.

Example:
    >>> cls = auto_model_class(AutoConfig.from_pretrained(path))   # AutoModelForCausalLM, ...
    >>> text_config(model).num_hidden_layers                        # Gemma-3: the language model's
    >>> with quiet_loading():
    ...     model = cls.from_pretrained(path)
"""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

__all__ = ["auto_model_class", "quiet_loading", "text_config"]


def auto_model_class(config: Any) -> Any:
    """The transformers auto class that builds ``config`` with its head: AutoModelForCausalLM for
    decoders, AutoModelForSeq2SeqLM for encoder-decoders, else AutoModel (BERT lists "BertModel").

    Example:
        >>> auto_model_class(LlamaConfig()).__name__
        'AutoModelForCausalLM'
    """
    import transformers
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    if getattr(config, "is_encoder_decoder", False):
        return transformers.AutoModelForSeq2SeqLM
    archs = list(getattr(config, "architectures", None) or [])
    if any(a.endswith(("ForCausalLM", "LMHeadModel")) for a in archs):
        return transformers.AutoModelForCausalLM
    # No architectures recorded: fall back on the model type (BERT lists "BertModel", so it stays AutoModel).
    if not archs and config.model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        return transformers.AutoModelForCausalLM
    return transformers.AutoModel


def text_config(obj: Any) -> Any:
    """The config that describes the language model: ``config.text_config`` of multimodal configs
    (Gemma-3), else the config itself. ``obj`` is a config or a model (its ``.config`` is used).

    Example:
        >>> text_config(gemma3_model) is gemma3_model.config.text_config
        True
    """
    config = getattr(obj, "config", obj)
    return getattr(config, "text_config", None) or config


@contextmanager
def quiet_loading() -> Iterator[None]:
    """Hide transformers' own progress bars ("Loading weights", the GGUF dequantiser's) for the block,
    so that ffnkit's progress stays readable; restores them afterwards.

    Example:
        >>> with quiet_loading():
        ...     model = AutoModelForCausalLM.from_pretrained(path)
    """
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    # The GGUF dequantiser draws a tqdm bar that ignores the switch above.
    gguf_utils = sys.modules.get("transformers.modeling_gguf_pytorch_utils")
    if gguf_utils is None:
        try:
            import transformers.modeling_gguf_pytorch_utils as gguf_utils
        except ImportError:
            gguf_utils = None
    old_tqdm = getattr(gguf_utils, "tqdm", None)
    if old_tqdm is not None:
        gguf_utils.tqdm = lambda iterable, *args, **kwargs: iterable
    try:
        yield
    finally:
        if old_tqdm is not None:
            gguf_utils.tqdm = old_tqdm
        if was_enabled:
            hf_logging.enable_progress_bar()

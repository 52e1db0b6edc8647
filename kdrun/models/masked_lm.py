"""The masked-LM head of a ``*ForMaskedLM`` model, to run it only where it is needed."""

from __future__ import annotations

from torch import Tensor, nn
from transformers import AutoModelForMaskedLM, PreTrainedModel, PreTrainedTokenizerBase

from kdrun.models.loading import (
    ModelSetupError,
    offline_hint,
    load_checked_config,
    load_tokenizer,
    resolve_model_path,
)


def masked_lm_logits(model: nn.Module, hidden: Tensor) -> Tensor:
    """Vocabulary logits of final hidden states ``hidden`` (any leading shape) through ``model``'s MLM head."""
    if hasattr(model, "vocab_projector"):  # DistilBERT spreads its head over four attributes
        return model.vocab_projector(model.vocab_layer_norm(model.activation(model.vocab_transform(hidden))))
    return masked_lm_head(model)(hidden)


def masked_lm_head(model: nn.Module) -> nn.Module:
    """The module mapping final hidden states to vocabulary logits.

    BERT calls it ``cls``, RoBERTa-style models ``lm_head``. Callers run it on the
    hidden states of the few positions they read: the vocabulary projection costs
    more than the encoder on short sequences.
    """
    for name in ("cls", "lm_head"):
        head = getattr(model, name, None)
        if isinstance(head, nn.Module):
            return head
    raise ValueError(f"{type(model).__name__} has no masked-LM head (neither .cls nor .lm_head).")


def load_masked_lm(reference: str, revision: str | None = None) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """A masked LM and its tokenizer, refusing a checkpoint whose MLM head would be random.

    ``from_pretrained`` silently initialises a missing head at random (the embedded
    MiniLM-L6 has none); its predictions would be noise, so that is an error here.
    """
    load_checked_config(reference, revision)
    tokenizer = load_tokenizer(reference, revision)
    try:
        model, info = AutoModelForMaskedLM.from_pretrained(
            resolve_model_path(reference), revision=revision, output_loading_info=True
        )
    except OSError as error:
        raise ModelSetupError(offline_hint(reference)) from error
    except ValueError as error:  # the architecture has no masked-LM class
        raise ModelSetupError(f"'{reference}' cannot be loaded as a masked LM: {error}") from error
    missing_head = [key for key in info.get("missing_keys", ()) if key.split(".")[0] in ("cls", "lm_head")]
    if missing_head:
        raise ModelSetupError(
            f"'{reference}' has no trained masked-LM head (missing {missing_head[:3]}...). Put the stage "
            "fit_mlm_head before this one in pipeline.stages (it trains one on the teacher), or point "
            "augment.mlm_model at a checkpoint that has one, e.g. a local copy of bert-base-uncased."
        )
    return model.eval(), tokenizer

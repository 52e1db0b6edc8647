"""BERT's masked-language-model corruption: 15% of tokens, of which 80% [MASK], 10% random, 10% kept."""

from __future__ import annotations

import zlib
from typing import Any

import torch
from transformers import PreTrainedTokenizerBase

from kdrun.data.batching import PaddingCollator


def mask_tokens(
    input_ids: torch.Tensor,
    special_tokens_mask: torch.Tensor,
    mask_token_id: int,
    vocab_size: int,
    probability: float = 0.15,
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(corrupted input ids, labels) with labels -100 everywhere but the chosen positions.

    ``special_tokens_mask`` is 1 for [CLS], [SEP] and padding, which are never chosen.
    Draws from ``generator`` (else the global RNG).
    """
    chosen_probability = torch.full(input_ids.shape, probability)
    chosen_probability.masked_fill_(special_tokens_mask.bool(), 0.0)
    chosen = torch.bernoulli(chosen_probability, generator=generator).bool()
    labels = input_ids.masked_fill(~chosen, -100)
    corrupted = input_ids.clone()
    to_mask = torch.bernoulli(torch.full(input_ids.shape, 0.8), generator=generator).bool() & chosen
    corrupted[to_mask] = mask_token_id
    to_random = torch.bernoulli(torch.full(input_ids.shape, 0.5), generator=generator).bool() & chosen & ~to_mask
    corrupted[to_random] = torch.randint(vocab_size, input_ids.shape, generator=generator)[to_random]
    return corrupted, labels


class MaskingCollator:
    """Pads a batch and corrupts it for MLM.

    The masks of a batch are drawn from a generator seeded by ``seed`` and the
    batch's example ids, not from the global RNG: data loaders fetch ahead of the
    training step, so global-RNG masks would differ after a resume.
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase, probability: float, seed: int):
        self.pad = PaddingCollator(tokenizer)
        self.tokenizer = tokenizer
        self.probability = probability
        self.seed = seed
        self.special_ids = torch.tensor(sorted(set(tokenizer.all_special_ids)))

    def __call__(self, features: list[dict[str, Any]]) -> dict[str, torch.Tensor]:
        batch = self.pad(features)
        ids = batch["example_id"].numpy().tobytes()
        generator = torch.Generator().manual_seed(zlib.crc32(ids, self.seed))
        special = torch.isin(batch["input_ids"], self.special_ids) | (batch["attention_mask"] == 0)
        batch["input_ids"], batch["labels"] = mask_tokens(
            batch["input_ids"], special, self.tokenizer.mask_token_id, len(self.tokenizer), self.probability, generator
        )
        return batch

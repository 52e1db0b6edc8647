"""BERT's masked-language-model corruption: 15% of tokens, of which 80% [MASK], 10% random, 10% kept."""

from __future__ import annotations

import torch


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

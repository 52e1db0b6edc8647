"""Per-example random generators, so augmentation can be sharded and resumed."""

from __future__ import annotations

import hashlib
import random


def example_rng(recipe: str, seed: int, source_id: int) -> random.Random:
    """A generator for one source example, determined by ``(recipe, seed, source_id)`` alone.

    Seeding per example (instead of one generator for the whole run) makes an example's
    copies independent of which other examples are augmented and in what order, so a
    run can be sharded, resumed or extended without changing existing rows. BLAKE2b is
    used because Python's ``hash()`` of strings changes between processes; ``recipe``
    keeps two recipes with the same seed from drawing the same numbers.
    """
    digest = hashlib.blake2b(f"{recipe}:{seed}:{source_id}".encode(), digest_size=8).digest()
    return random.Random(int.from_bytes(digest, "big"))

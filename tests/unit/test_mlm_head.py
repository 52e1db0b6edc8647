"""MLM masking and the fit_mlm_head stage."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from kdrun.data.mlm import mask_tokens


def test_masking_rates_and_specials() -> None:
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(1000, 2000, (400, 128), generator=generator)
    special = torch.zeros_like(input_ids, dtype=torch.bool)
    special[:, 0] = special[:, -1] = True  # [CLS] ... [SEP]
    corrupted, labels = mask_tokens(input_ids, special, mask_token_id=103, vocab_size=3000, probability=0.15, generator=generator)
    chosen = labels != -100
    assert not chosen[special].any()
    assert torch.equal(labels[chosen], input_ids[chosen])
    assert torch.equal(corrupted[~chosen], input_ids[~chosen])
    n = int(chosen.sum())
    candidates = 400 * 126
    assert abs(n / candidates - 0.15) < 0.01  # 15% of 50,400 positions: sd ~0.0016
    masked = int((corrupted[chosen] == 103).sum())
    kept = int((corrupted[chosen] == input_ids[chosen]).sum())
    assert abs(masked / n - 0.8) < 0.02
    assert abs(kept / n - 0.1) < 0.02  # random replacements rarely hit the original token
    assert abs((n - masked - kept) / n - 0.1) < 0.02


def test_same_generator_seed_same_masks() -> None:
    ids = torch.arange(100, 164).reshape(4, 16)
    special = torch.zeros_like(ids, dtype=torch.bool)
    first = mask_tokens(ids, special, 103, 3000, 0.15, torch.Generator().manual_seed(5))
    second = mask_tokens(ids, special, 103, 3000, 0.15, torch.Generator().manual_seed(5))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_fit_mlm_head_learns_on_a_frozen_encoder(run_kdrun, tiny_bert_dir, tmp_path) -> None:
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("the cat sat on the mat and the dog sat on the log ." for _ in range(200)) + "\n")
    run_kdrun(
        "experiment=mlm_head", "scale=smoke", "device=cpu", f"teacher.path={tiny_bert_dir}", f"data.corpus={corpus}",
        "fit_mlm_head.max_sequences=160", "fit_mlm_head.heldout_sequences=32", "fit_mlm_head.train.max_steps=40",
        "fit_mlm_head.train.epochs=4", "fit_mlm_head.train.learning_rate=1e-2", "fit_mlm_head.train.eval_every_steps=20",
    )
    [manifest] = list((tmp_path / "cache" / "fit_mlm_head").glob("*/stage.json"))
    summary = json.loads(manifest.read_text())["summary"]
    before = summary["heldout_before_training"]["masked_token_accuracy"]
    after = summary["heldout"]["masked_token_accuracy"]
    assert summary["steps"] == 40 and summary["heldout_sequences"] == 32
    assert after > before + 0.2  # "the" alone is a quarter of the tokens
    from transformers import AutoModelForMaskedLM
    from safetensors.torch import load_file

    model = AutoModelForMaskedLM.from_pretrained(manifest.parent / "model")
    encoder = load_file(str(Path(tiny_bert_dir) / "model.safetensors"))
    # The encoder was frozen: its weights are the teacher's, bit for bit.
    state = model.state_dict()
    compared = 0
    for name, tensor in encoder.items():
        key = name if name.startswith("bert.") else f"bert.{name}"
        if key in state:
            assert torch.equal(state[key], tensor), name
            compared += 1
    assert compared >= 30  # embeddings and both layers (the pooler is not part of an MLM model)

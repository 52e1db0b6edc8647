"""Stage general_distill: task-agnostic distillation on a plain-text corpus.

The method (``distill``, ``kdrun/methods``) builds the job: TinyBERT and MiniLM train a randomly
initialised BERT student on the pre-trained (not fine-tuned) teacher's layers over packed corpus
sequences; DistilBERT trains a student copied from every other teacher layer with its triple loss on
MLM-corrupted sequences, with the teacher's MLM head from a preceding fit_mlm_head stage when there
is one. Output: ``model/``, which task distillation starts from.
"""

from __future__ import annotations

from typing import Any

from omegaconf import DictConfig

from kdrun.data.corpus import check_corpus, corpus_dataset
from kdrun.methods import method_of
from kdrun.stages.context import StageContext
from kdrun.train import TrainingJob, seed_everything, train


def check(cfg: DictConfig) -> None:
    method_of(cfg).check(cfg, "general_distill")
    check_corpus(cfg.data.corpus)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    method = method_of(cfg)
    settings = cfg.general_distill
    seed_everything(settings.train.seed)  # before the student is built: its random initialisation
    setup = method.general_setup(ctx)
    corpus = corpus_dataset(cfg.data.corpus, setup.tokenizer, settings.max_seq_length, settings.max_sequences, out_dir / "corpus")
    job = TrainingJob(
        model=setup.model,
        train_features=corpus,
        collate=setup.collate,
        compute_loss=setup.compute_loss,
        save_model=setup.save_model,
        description=f"general_distill ({method.name})",
    )
    outcome = train(job, settings.train, cfg.device, out_dir)
    return {
        "model_dir": "model",
        **setup.summary,
        "corpus_sequences": len(corpus),
        "corpus_tokens": int(sum(corpus["length"])),
        "parameters": setup.parameters,
        "sequences_per_second": round(outcome.examples_per_second, 2),
        **outcome.summary(),
    }

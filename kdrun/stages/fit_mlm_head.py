"""Stage fit_mlm_head: a masked-LM head for a teacher that has none.

The embedded MiniLM-L6 teacher ships without its MLM head, but TinyBERT's data
augmentation and DistilBERT's losses need the teacher's masked-token
predictions. This stage trains the standard BERT head (transform + decoder tied
to the word embeddings, plus its bias) on the frozen encoder over the general
corpus, and reports masked-token accuracy on held-out corpus sequences.
Output: ``model/``, a ``BertForMaskedLM``-style checkpoint with tokenizer.
"""

from __future__ import annotations

from typing import Any

import torch
from omegaconf import DictConfig
from torch import nn
from transformers import AutoModelForMaskedLM

from kdrun.data.batching import sorted_eval_batches
from kdrun.data.corpus import check_corpus, corpus_dataset
from kdrun.data.mlm import MaskingCollator
from kdrun.models.masked_lm import masked_lm_head
from kdrun.models.loading import load_checked_config, load_tokenizer, model_saver, resolve_model_path
from kdrun.metrics import Evaluation
from kdrun.stages.context import StageContext
from kdrun.predict import model_inputs
from kdrun.train import TrainingJob, get_accelerator, seed_everything, train


class MlmHeadOnFrozenEncoder(nn.Module):
    """Runs the frozen encoder without gradients and the head only at the masked positions,
    which is all the loss reads (the vocabulary projection is most of the head's cost).

    ``train_top_layers`` > 0 also trains the encoder's last layers; the word embeddings
    (tied to the head's decoder) always stay frozen.
    """

    def __init__(self, mlm_model: nn.Module, train_top_layers: int = 0):
        super().__init__()
        self.mlm = mlm_model
        self.mlm.base_model.requires_grad_(False)
        self.train_top_layers = train_top_layers
        if train_top_layers:
            layers = self.mlm.base_model.encoder.layer
            # More than the encoder has means all of them (a config written for a deeper teacher).
            for layer in layers[max(len(layers) - train_top_layers, 0) :]:
                layer.requires_grad_(True)

    @property
    def head(self) -> nn.Module:  # a property, so the head's parameters are not registered twice
        return masked_lm_head(self.mlm)

    def forward(self, inputs: dict[str, torch.Tensor], labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean cross-entropy over masked tokens, number of correct top-1 predictions)."""
        self.mlm.base_model.eval()  # no dropout in the frozen encoder
        with torch.set_grad_enabled(self.train_top_layers > 0 and torch.is_grad_enabled()):
            hidden = self.mlm.base_model(**inputs).last_hidden_state
        chosen = labels != -100
        logits = self.head(hidden[chosen])
        if logits.shape[0] == 0:  # nothing masked in this batch: a zero loss that still has a graph
            return logits.sum() * 0.0, torch.zeros((), dtype=torch.long)
        loss = nn.functional.cross_entropy(logits, labels[chosen])
        return loss, (logits.argmax(-1) == labels[chosen]).sum()


@torch.inference_mode()
def masked_token_accuracy(model: MlmHeadOnFrozenEncoder, features, tokenizer, probability: float, batch_size: int, seed: int) -> dict[str, float]:
    """Top-1 accuracy and loss at the masked positions of held-out sequences, with a fixed masking seed."""
    collate = MaskingCollator(tokenizer, probability, seed)
    device = next(model.parameters()).device
    correct, total, loss_sum = 0, 0, 0.0
    for indices in sorted_eval_batches(features["length"], batch_size):
        batch = collate([features[i] for i in indices])
        labels = batch["labels"].to(device)
        loss, hits = model(model_inputs(batch, device), labels)
        count = int((labels != -100).sum())
        correct, total, loss_sum = correct + int(hits), total + count, loss_sum + float(loss) * count
    return {"masked_token_accuracy": correct / max(total, 1), "mlm_loss": loss_sum / max(total, 1), "masked_tokens": float(total)}


def check(cfg: DictConfig) -> None:
    load_checked_config(cfg.teacher.path, cfg.teacher.revision)
    check_corpus(cfg.data.corpus)


def run(ctx: StageContext) -> dict[str, Any]:
    cfg, out_dir = ctx.cfg, ctx.out_dir
    settings = cfg.fit_mlm_head
    accelerator = get_accelerator(cfg.device)
    seed_everything(settings.train.seed)
    tokenizer = load_tokenizer(cfg.teacher.path, cfg.teacher.revision)
    mlm = AutoModelForMaskedLM.from_pretrained(resolve_model_path(cfg.teacher.path), revision=cfg.teacher.revision)
    model = MlmHeadOnFrozenEncoder(mlm, settings.train_top_layers)
    wanted = None if settings.max_sequences is None else settings.max_sequences + settings.heldout_sequences
    corpus = corpus_dataset(cfg.data.corpus, tokenizer, settings.max_seq_length, wanted, out_dir / "corpus")
    heldout = corpus.select(range(len(corpus) - settings.heldout_sequences, len(corpus)))
    train_set = corpus.select(range(len(corpus) - settings.heldout_sequences))

    def evaluate(module: nn.Module) -> Evaluation:
        return Evaluation(masked_token_accuracy(module, heldout, tokenizer, settings.mlm_probability, settings.train.eval_batch_size, seed=0))

    before = evaluate(model.to(accelerator.device)).metrics
    outcome = train(
        TrainingJob(
            model=model,
            train_features=train_set,
            collate=MaskingCollator(tokenizer, settings.mlm_probability, settings.train.seed),
            compute_loss=lambda m, batch: m(model_inputs(batch), batch["labels"])[0],
            save_model=model_saver(tokenizer, lambda module: module.mlm),
            evaluate=evaluate,
            best_metric="masked_token_accuracy",
            description="fit_mlm_head",
        ),
        settings.train,
        cfg.device,
        out_dir,
    )
    return {
        "model_dir": "model",
        "train_sequences": len(train_set),
        "heldout_sequences": len(heldout),
        "heldout_before_training": before,
        "heldout": outcome.best_metrics,
        **outcome.summary(),
    }

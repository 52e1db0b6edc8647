"""Pipeline stages, one module each; importing this package registers them."""

from kdrun.stages import evaluate, finetune_teacher  # noqa: F401

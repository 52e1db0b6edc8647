"""Pipeline stages, one module each; importing this package registers them."""

from kdrun.stages import augment, evaluate, finetune_teacher, fit_mlm_head, general_distill, task_distill  # noqa: F401

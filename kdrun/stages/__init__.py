"""Pipeline stages, one module each; importing this package registers them."""

from kdrun.stages import (  # noqa: F401
    augment,
    evaluate,
    export,
    finetune_teacher,
    fit_mlm_head,
    general_distill,
    quantize,
    sensitivity,
    task_distill,
)

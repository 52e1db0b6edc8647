"""kdrun: compress BERT models by knowledge distillation and quantization, from Hydra configs."""

__version__ = "0.1.0"

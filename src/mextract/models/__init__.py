"""The model zoo and checkpoint I/O."""

from mextract.models.checkpoint import load_checkpoint, read_meta, save_checkpoint
from mextract.models.zoo import MODELS, check_model_name, create_model, default_model_for

__all__ = [
    "MODELS",
    "check_model_name",
    "create_model",
    "default_model_for",
    "load_checkpoint",
    "read_meta",
    "save_checkpoint",
]

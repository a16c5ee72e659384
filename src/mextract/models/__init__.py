"""The model zoo, checkpoint I/O, and victims from model files (ONNX, skops, XGBoost, LightGBM)."""

from mextract.models.checkpoint import load_checkpoint, read_meta, save_checkpoint, schema_of, split_seed_of
from mextract.models.external import ExternalModel, is_model_file, load_external
from mextract.models.zoo import MODELS, check_model_name, create_model, default_model_for

__all__ = [
    "MODELS",
    "ExternalModel",
    "check_model_name",
    "create_model",
    "default_model_for",
    "is_model_file",
    "load_checkpoint",
    "load_external",
    "read_meta",
    "save_checkpoint",
    "schema_of",
    "split_seed_of",
]

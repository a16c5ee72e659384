"""Defences: wrappers around an oracle that are themselves oracles, so they stack."""

from mextract.defences.cosine import CosineVerification, CosineWatermark
from mextract.defences.detection import ExtractionDetectedError, Prada, PradaClient, calibrate_delta
from mextract.defences.ownership import DawnWatermark, TriggerWatermark, watermark_training_set
from mextract.defences.perturb import (
    AdaptiveMisinformation,
    HoneyLabels,
    LabelOnly,
    NoisyProbabilities,
    PredictionPoisoning,
    ReverseSigmoid,
    Rounding,
    TopK,
    misinformation_loss,
)

__all__ = [
    "AdaptiveMisinformation",
    "CosineVerification",
    "CosineWatermark",
    "DawnWatermark",
    "ExtractionDetectedError",
    "HoneyLabels",
    "LabelOnly",
    "NoisyProbabilities",
    "Prada",
    "PradaClient",
    "PredictionPoisoning",
    "ReverseSigmoid",
    "Rounding",
    "TopK",
    "TriggerWatermark",
    "calibrate_delta",
    "misinformation_loss",
    "watermark_training_set",
]

"""Defences: wrappers around an oracle that are themselves oracles, so they stack."""

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
    "HoneyLabels",
    "LabelOnly",
    "NoisyProbabilities",
    "PredictionPoisoning",
    "ReverseSigmoid",
    "Rounding",
    "TopK",
    "misinformation_loss",
]

"""Direct extraction: recover a victim's parameters themselves by solving equations on its answers.

* :class:`EquationSolving` — (multinomial) logistic regression from ``d + 1`` queries
  (Tramèr et al., USENIX Security 2016), with a least-squares variant and a guaranteed
  error bound for rounded probabilities.
* :class:`ReLUCryptanalysis` — one-hidden-layer ReLU networks with logit outputs, exact
  up to the network's symmetry (Jagielski et al. 2020; Carlini, Jagielski & Mironov,
  CRYPTO 2020).
* :class:`ReLU2Cryptanalysis` — two hidden layers, layer by layer (Carlini et al. 2020);
  exact when it succeeds, a clear error otherwise.
* :mod:`~mextract.attacks.direct.align` — parameter error after permutation/scale alignment.
"""

from mextract.attacks.direct.align import (
    LinearError,
    ReLUAlignment,
    align_relu1,
    linear_error,
    query_floor,
    relu1_parameters,
)
from mextract.attacks.direct.common import (
    AnswerModeError,
    DirectExtractionError,
    NotPiecewiseLinearError,
    UnsupportedVictimError,
)
from mextract.attacks.direct.deep import ReLU2Cryptanalysis, align_relu2, relu2_model, relu2_parameters
from mextract.attacks.direct.equations import EquationSolving, linear_model
from mextract.attacks.direct.relu import ReLUCryptanalysis, gaussian_relu1, relu1_model

__all__ = [
    "AnswerModeError",
    "DirectExtractionError",
    "EquationSolving",
    "LinearError",
    "NotPiecewiseLinearError",
    "ReLU2Cryptanalysis",
    "ReLUAlignment",
    "ReLUCryptanalysis",
    "UnsupportedVictimError",
    "align_relu1",
    "align_relu2",
    "gaussian_relu1",
    "linear_error",
    "linear_model",
    "query_floor",
    "relu1_model",
    "relu1_parameters",
    "relu2_model",
    "relu2_parameters",
]

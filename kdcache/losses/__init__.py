"""Distillation losses: plain ``nn.Module``s, argument order always ``(student, teacher)``.

Each is usable in any training loop, with cached teacher outputs or live ones; they know no
cache. Decoded sparse teacher rows (:mod:`.targets`) are their keyword arguments.

- :mod:`.dense`      ``KLDivLoss`` (Hinton's ``T^2 KL``), ``SoftTargetCrossEntropy``
- :mod:`.divergences` ``DivergenceLoss``, ``ReverseKLDivLoss``, ``JSDivLoss`` (GKD's generalised JSD)
- :mod:`.sparse`     ``TopKKLDivLoss``, ``SampledKLDivLoss``, ``HybridKLDivLoss``
- :mod:`.hints`      ``HiddenStateLoss`` (FitNets), ``AttentionTransferLoss``
- :mod:`.reduction`  reductions and checks they share
- :mod:`.targets`    the decoded teacher targets they take
"""

from .dense import KLDivLoss, SoftTargetCrossEntropy
from .divergences import DivergenceLoss, JSDivLoss, ReverseKLDivLoss
from .hints import AttentionTransferLoss, HiddenStateLoss
from .sparse import HybridKLDivLoss, SampledKLDivLoss, TopKKLDivLoss

__all__ = ["KLDivLoss", "SoftTargetCrossEntropy", "DivergenceLoss", "ReverseKLDivLoss", "JSDivLoss", "TopKKLDivLoss", "SampledKLDivLoss", "HybridKLDivLoss",
           "HiddenStateLoss", "AttentionTransferLoss"]

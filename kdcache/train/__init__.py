"""Stage two: train the student from cached teacher outputs (or plainly, or online for comparisons).

- :mod:`.loop`        :func:`train_student`: epochs, the KD term, hints, checkpoints
- :mod:`.teacher`     where the step's teacher outputs come from (cache, live module, none)
- :mod:`.kdterm`      the KD term any loop uses (codec, padded vocabulary, objective)
- :mod:`.monitor`     the student against the teacher per epoch; the overfit-to-cache warning
- :mod:`.evaluate`    accuracy and loss on labelled data
- :mod:`.checkpoint`  what a run writes to its ``--out``
"""

from ..config import Hint, TrainConfig
from .checkpoint import NonFiniteLoss
from .evaluate import evaluate
from .loop import TrainResult, train_student

__all__ = ["train_student", "evaluate", "TrainResult", "TrainConfig", "Hint", "NonFiniteLoss"]

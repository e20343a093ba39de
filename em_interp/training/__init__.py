"""Training: the objective (`objective`: CE + λ·KL), the engine (`engine`: cached partial forwards, several
adapters in one batched forward), the loop (`loop`: `train`, `train_many`, `continue_run`), runs and
checkpoints (`runs`, `checkpoint`), and continuations (`continuation`: `reversion`).

>>> run = em.train(vec, model, data, kl_data=kl_data, kl_coef=1.0, lr=5e-4)  # doctest: +SKIP
"""

from em_interp.config import TrainConfig
from em_interp.training.continuation import Reversion, reversion
from em_interp.training.loop import continue_run, train, train_many
from em_interp.training.runs import TrainRun

__all__ = ["Reversion", "TrainConfig", "TrainRun", "continue_run", "reversion", "train", "train_many"]

"""Training: `train()` (spec -> run directory), the loop, losses, metrics, plots, data parallelism."""

from toolkit.train.loop import FitSetup, Progress, TrainResult, fit
from toolkit.train.losses import LOSSES, get_loss
from toolkit.train.run import pick_device, train

__all__ = ["LOSSES", "FitSetup", "Progress", "TrainResult", "fit", "get_loss", "pick_device", "train"]

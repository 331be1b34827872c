"""One loss term per file; re-exported here only."""
from training.losses.dino_clstoken import DINOLoss
from training.losses.expert_cls import ExpertCLSLoss
from training.losses.expert_patch import ExpertPatchLoss, resize_token_grid
from training.losses.ibot_patch import IBOTPatchLoss
from training.losses.koleo import KoLeoLoss

__all__ = ["DINOLoss", "ExpertCLSLoss", "ExpertPatchLoss", "IBOTPatchLoss", "KoLeoLoss", "resize_token_grid"]

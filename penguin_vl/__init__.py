"""A lean, checkpoint-compatible model of the Penguin-VL vision encoder, with Triton acceleration."""

from penguin_vl.config import PenguinEncoderConfig, ProjectorConfig
from penguin_vl.loading import CheckpointError, save_encoder
from penguin_vl.model import PenguinEncoder, PenguinProjector

__all__ = [
    "CheckpointError",
    "PenguinEncoder",
    "PenguinEncoderConfig",
    "PenguinProjector",
    "ProjectorConfig",
    "save_encoder",
]

"""A lean, checkpoint-compatible model of the Penguin-VL vision encoder, with Triton acceleration."""

from penguin_vl.config import PenguinEncoderConfig, ProjectorConfig
from penguin_vl.hub import ModelNotFoundError
from penguin_vl.loading import CheckpointError, save_encoder
from penguin_vl.model import PenguinEncoder, PenguinProjector
from penguin_vl.processor import ImageProcessor, ProcessorOutput
from penguin_vl.video import Video, VideoError, load_video

__all__ = [
    "CheckpointError",
    "ImageProcessor",
    "ModelNotFoundError",
    "PenguinEncoder",
    "PenguinEncoderConfig",
    "PenguinProjector",
    "ProcessorOutput",
    "ProjectorConfig",
    "Video",
    "VideoError",
    "load_video",
    "save_encoder",
]

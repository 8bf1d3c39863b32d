"""Video files in: the reference's frame sampling, timestamps and key frames (SPEC section 8), exact,
decoding only the frames it keeps, in memory bounded by what it returns."""

from penguin_vl.video.keyframes import KeyFrameTyper, rgb_to_hsv
from penguin_vl.video.load import Video, VideoError, load_video

__all__ = ["KeyFrameTyper", "Video", "VideoError", "load_video", "rgb_to_hsv"]

"""Video files in: the reference's frame sampling, timestamps and key frames (SPEC section 8), exact,
decoding only the frames it keeps, in memory bounded by what it returns."""

from penguin_vl.video.keyframes import KeyFrameTyper, rgb_to_hsv
from penguin_vl.video.load import VIDEO_SUFFIXES, Video, VideoError, check_sampling, is_video_file, load_video

__all__ = [
    "VIDEO_SUFFIXES",
    "KeyFrameTyper",
    "Video",
    "VideoError",
    "check_sampling",
    "is_video_file",
    "load_video",
    "rgb_to_hsv",
]

"""Video data: PyAV decoding, WebDataset shards (writing and streaming) and the synthetic captioned set.

`data` is the bottom layer: `tokenizer`, `dit3d`, `train.py` and `sample.py` may import it; it imports none of them.
"""

from .loader import ShardLoader, make_loader
from .samples import SkipRecord
from .tar_reader import expand_urls, iter_shard_samples
from .shards import LATENT_EXT, ShardWriter, latent_sample
from .video_io import (
    Clip,
    ClipTooShortError,
    VideoInfo,
    VideoReadError,
    check_frame_count,
    frames_to_tensor,
    probe,
    iter_clip,
    read_clip,
    read_image,
    read_last_frames,
    read_video,
    tensor_to_frames,
)
from .video_write import encode_mp4, video_writer, write_video

__all__ = [
    "Clip",
    "ClipTooShortError",
    "LATENT_EXT",
    "ShardLoader",
    "ShardWriter",
    "SkipRecord",
    "VideoInfo",
    "VideoReadError",
    "check_frame_count",
    "encode_mp4",
    "expand_urls",
    "frames_to_tensor",
    "iter_shard_samples",
    "latent_sample",
    "make_loader",
    "probe",
    "iter_clip",
    "read_clip",
    "read_image",
    "read_last_frames",
    "read_video",
    "tensor_to_frames",
    "video_writer",
    "write_video",
]

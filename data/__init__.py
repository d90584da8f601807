"""Video data: PyAV decoding, WebDataset shards (writing and streaming) and the synthetic captioned set.

`data` is the bottom layer: `tokenizer`, `dit3d`, `train.py` and `sample.py` may import it; it imports none of them.
"""

from .shards import LATENT_EXT, ShardWriter, latent_sample
from .video_io import (
    Clip,
    ClipTooShortError,
    VideoInfo,
    VideoReadError,
    check_frame_count,
    encode_mp4,
    frames_to_tensor,
    probe,
    read_clip,
    read_video,
    tensor_to_frames,
    write_video,
)

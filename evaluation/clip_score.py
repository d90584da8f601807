"""Text-video alignment: CLIPSIM, the mean over frames of 100 x cos(CLIP image embedding, CLIP text embedding),
from a local CLIP folder (a transformers `CLIPModel` with its tokenizer and image processor, as
`save_pretrained` writes them). Nothing is downloaded.

    clip = ClipScore.from_local("path/to/clip-vit-base-patch32")
    clip.video(video, "a red circle moving right")   # video (3, T, H, W) in [-1, 1] -> a float

Frames go through the folder's own image processor (resize, centre crop, normalisation), so the figure is the
one `CLIPModel`'s `logits_per_image / logit_scale` gives, times 100. Up to `frames` evenly spaced frames are
scored per video (all when it has fewer).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from errors import InputError, MissingInputError


def _embedding(out) -> torch.Tensor:
    """transformers 5 returns an output with the projected `pooler_output`; 4.x returned the tensor."""
    return out if isinstance(out, torch.Tensor) else out.pooler_output


class ClipScore:
    def __init__(self, model, tokenizer, processor, device: str | torch.device = "cpu", frames: int = 8):
        self.model, self.tokenizer, self.processor = model.eval().to(device), tokenizer, processor
        self.device, self.frames = torch.device(device), frames

    @staticmethod
    def check_folder(path: Path) -> None:
        """A one-line error, naming what is missing, unless `path` holds what save_pretrained writes."""
        missing = [n for n in ("config.json", "preprocessor_config.json") if not (path / n).is_file()]
        if missing:
            raise MissingInputError(f"{path} is not a CLIP model folder: "
                                    f"{'no such folder' if not path.is_dir() else ', '.join(missing) + ' missing'} "
                                    f"(save CLIPModel, its tokenizer and image processor there with save_pretrained; "
                                    f"nothing is downloaded)")

    @classmethod
    def from_local(cls, path: str | Path, device: str | torch.device = "cpu", frames: int = 8) -> "ClipScore":
        path = Path(path)
        cls.check_folder(path)
        try:
            from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel
        except ImportError as e:
            raise InputError(f"CLIP alignment needs transformers: pip install -e '.[text]' ({e})") from None
        model = CLIPModel.from_pretrained(path)
        return cls(model, AutoTokenizer.from_pretrained(path), CLIPImageProcessor.from_pretrained(path), device, frames)

    @torch.no_grad()
    def text(self, captions: list[str]) -> torch.Tensor:
        """(N, D) unit text embeddings."""
        inputs = self.tokenizer(captions, padding=True, truncation=True, return_tensors="pt").to(self.device)
        e = _embedding(self.model.get_text_features(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask))
        return torch.nn.functional.normalize(e.float(), dim=-1)

    @torch.no_grad()
    def images(self, frames: np.ndarray) -> torch.Tensor:
        """(T, D) unit image embeddings of uint8 frames (T, H, W, 3)."""
        pixels = self.processor(images=list(frames), return_tensors="pt").pixel_values.to(self.device)
        return torch.nn.functional.normalize(_embedding(self.model.get_image_features(pixel_values=pixels)).float(), dim=-1)

    def frames_of(self, video: torch.Tensor) -> np.ndarray:
        """Up to `self.frames` evenly spaced frames of (3, T, H, W) in [-1, 1], as uint8 (n, H, W, 3)."""
        t = video.shape[1]
        index = np.unique(np.linspace(0, t - 1, min(t, self.frames)).round().astype(int))
        return ((video[:, index].float().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 3, 0).cpu().numpy()

    def video(self, video: torch.Tensor, caption: str) -> float:
        """CLIPSIM of one video (3, T, H, W) in [-1, 1] against its caption."""
        return float(100 * (self.images(self.frames_of(video)) @ self.text([caption])[0]).mean())

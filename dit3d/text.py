"""Text encoders behind one interface: `encode(captions) -> (tokens (B, L, dim), mask (B, L))`.

- `ByteTextEncoder`: built in and offline. UTF-8 bytes are the tokens, embedded and passed through a
  small transformer that is trained together with the DiT (its parameters go to the same optimiser).
  No vocabulary file, no download, any language.
- `HFTextEncoder`: a frozen Hugging Face encoder (T5, UMT5 or CLIP text) loaded with its tokenizer from a
  local folder, never from the hub. Needs the optional `transformers` dependency (`pip install '.[text]'`).

`mask` is True for real tokens. Padding positions of `tokens` are zero, and the DiT's cross-attention
ignores them through the mask. Classifier-free guidance uses the DiT's learned null condition, not an
empty caption.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn


class TextEncoder(Protocol):
    dim: int

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


@dataclass(frozen=True)
class ByteTextConfig:
    dim: int = 64  # token width (the DiT's text_dim)
    layers: int = 2
    heads: int = 4
    max_bytes: int = 96  # longer captions are truncated


class ByteTextEncoder(nn.Module):
    PAD = 256  # byte values are 0..255

    def __init__(self, config: ByteTextConfig = ByteTextConfig()):
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.embed = nn.Embedding(257, config.dim)
        self.position = nn.Parameter(torch.randn(config.max_bytes, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def tokenize(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """Byte ids (B, L) and mask (B, L), padded to the longest caption (at least one token each)."""
        encoded = [list(c.encode("utf-8"))[: self.config.max_bytes] or [ord(" ")] for c in captions]
        length = max(len(e) for e in encoded)
        ids = torch.full((len(captions), length), self.PAD, dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
        return ids, ids != self.PAD

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(ids) + self.position[: ids.shape[1]]
        h = self.norm(self.encoder(h, src_key_padding_mask=~mask))
        return h * mask[..., None]

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.position.device
        ids, mask = self.tokenize(captions)
        ids, mask = ids.to(device), mask.to(device)
        return self(ids, mask), mask

    def save_pretrained(self, directory) -> None:
        from data.pretrained import save_model

        save_model(self, directory, kind="text-bytes")

    @classmethod
    def from_pretrained(cls, directory) -> "ByteTextEncoder":
        from data.pretrained import load_model

        return load_model(cls, ByteTextConfig, directory, kind="text-bytes")

class HFTextEncoder:
    """A frozen Hugging Face text encoder from a local folder (config, weights and tokenizer files)."""

    def __init__(self, path: str | os.PathLike, max_length: int = 512, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32):
        try:
            import transformers
        except ImportError as e:
            raise ImportError("HFTextEncoder needs transformers: pip install '.[text]'") from e
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no text encoder at {path}: give a local folder holding a Hugging Face T5, "
                                    f"UMT5 or CLIP text model and its tokenizer (nothing is downloaded)")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        classes = {"t5": transformers.T5EncoderModel, "umt5": transformers.UMT5EncoderModel,
                   "clip": transformers.CLIPTextModel, "clip_text_model": transformers.CLIPTextModel}
        if config.model_type not in classes:
            raise ValueError(f"{path} holds a {config.model_type!r} model; supported: {', '.join(sorted(classes))}")
        self.model = classes[config.model_type].from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(path, local_files_only=True)
        self.max_length = max_length
        text_config = getattr(config, "text_config", config)
        self.dim = getattr(text_config, "d_model", None) or text_config.hidden_size
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = self.tokenizer(captions, padding="longest", truncation=True, max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        mask = batch["attention_mask"].bool()
        tokens = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        return tokens * mask[..., None], mask

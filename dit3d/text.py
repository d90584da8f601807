"""Text encoders behind one interface: `encode(captions) -> (tokens (B, L, dim), mask (B, L))`.

- The built-in encoders work offline with no vocabulary file and no download. Their tokens are embedded and
  passed through a small transformer that is trained together with the DiT (its parameters go to the same
  optimiser). Two ways to cut a caption into tokens:
  - `ByteTextEncoder`: UTF-8 bytes. Any language and any spelling; the transformer must learn words itself.
  - `WordTextEncoder`: lower-cased words and punctuation marks, each hashed (CRC-32) into one of `buckets`
    embeddings (the hashing trick: no vocabulary to build or ship; two words may share a bucket, rarely
    with a few thousand buckets and a small vocabulary). A word is one token wherever it stands in the
    caption. Bytes stay the default: words did not beat them on the quickstart (docs/training.md).
- `HFTextEncoder`: a frozen Hugging Face encoder (T5, UMT5 or CLIP text) loaded with its tokenizer from a
  local folder, never from the hub. Needs the optional `transformers` dependency (`pip install '.[text]'`).

`mask` is True for real tokens. Padding positions of `tokens` are zero, and the DiT's cross-attention
ignores them through the mask. Classifier-free guidance uses the DiT's learned null condition, not an
empty caption.
"""

from __future__ import annotations

import logging
import os
import re
import zlib
from dataclasses import dataclass
from typing import Protocol

import torch
import torch.nn as nn

from checkpoint_io import load_model, save_model

log = logging.getLogger(__name__)


class TextEncoder(Protocol):
    dim: int

    def encode(self, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]: ...


class _LearnedTextEncoder(nn.Module):
    """Token ids -> embeddings + learned positions -> a small pre-norm transformer. Subclasses cut the text."""

    KIND: str  # recorded in the saved config
    PAD: int  # the padding id

    def __init__(self, config, vocab: int, max_tokens: int):
        super().__init__()
        self.config = config
        self.dim = config.dim
        self.embed = nn.Embedding(vocab, config.dim)
        self.position = nn.Parameter(torch.randn(max_tokens, config.dim) * 0.02)
        layer = nn.TransformerEncoderLayer(config.dim, config.heads, 4 * config.dim, dropout=0.0, activation="gelu",
                                           batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, config.layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(config.dim)

    def token_ids(self, caption: str) -> list[int]:
        """One caption's ids, unpadded and at least one; each subclass cuts text its own way."""
        raise NotImplementedError

    def tokenize(self, captions: list[str], fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Token ids (B, L) and mask (B, L), padded to the longest caption (at least one token each), or with
        fixed=True to the most the encoder reads, so that a caption's tokens do not depend on its batch."""
        limit = self.position.shape[0]
        encoded = [self.token_ids(c) for c in captions]
        for caption, e in zip(captions, encoded):
            if len(e) > limit:
                self._report_cut(caption, len(e), limit)
        encoded = [e[:limit] for e in encoded]
        length = limit if fixed else max(len(e) for e in encoded)
        ids = torch.full((len(captions), length), self.PAD, dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, : len(e)] = torch.tensor(e)
        return ids, ids != self.PAD

    def _report_cut(self, caption: str, length: int, limit: int) -> None:
        """Warn, once per encoder, that captions are cut to what it reads; count every one in `cut_captions`."""
        self.cut_captions = getattr(self, "cut_captions", 0) + 1
        if self.cut_captions == 1:
            unit = "bytes" if self.KIND == "text-bytes" else "words"
            log.warning("a caption of %d %s is cut to the %d the built-in %s encoder reads (%r...); later cuts are "
                        "counted, not shown. Shorten the captions, or train with a pretrained --text-encoder",
                        length, unit, limit, self.KIND, caption[:60])

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
        save_model(self, directory, kind=self.KIND)

    @classmethod
    def from_pretrained(cls, directory):
        return load_model(cls, cls.CONFIG, directory, kind=cls.KIND)


@dataclass(frozen=True)
class _LearnedTextConfig:
    dim: int = 64  # token width (the DiT's text_dim)
    layers: int = 2  # transformer layers
    heads: int = 4


@dataclass(frozen=True)
class ByteTextConfig(_LearnedTextConfig):
    max_bytes: int = 96  # longer captions are truncated


class ByteTextEncoder(_LearnedTextEncoder):
    KIND, CONFIG = "text-bytes", ByteTextConfig
    PAD = 256  # byte values are 0..255

    def __init__(self, config: ByteTextConfig = ByteTextConfig()):
        super().__init__(config, vocab=257, max_tokens=config.max_bytes)

    def token_ids(self, caption: str) -> list[int]:
        return list(caption.encode("utf-8")) or [ord(" ")]


@dataclass(frozen=True)
class WordTextConfig(_LearnedTextConfig):
    max_words: int = 64  # longer captions are truncated
    buckets: int = 4096  # hashed word embeddings (bucket 0 is padding)


class WordTextEncoder(_LearnedTextEncoder):
    KIND, CONFIG = "text-words", WordTextConfig
    PAD = 0
    _WORD = re.compile(r"\w+|[^\w\s]")

    def __init__(self, config: WordTextConfig = WordTextConfig()):
        if config.buckets < 2:
            raise ValueError(f"WordTextConfig.buckets must be at least 2 (bucket 0 is padding), got {config.buckets}")
        super().__init__(config, vocab=config.buckets, max_tokens=config.max_words)

    def token_ids(self, caption: str) -> list[int]:
        words = self._WORD.findall(caption.lower()) or [""]
        return [1 + zlib.crc32(w.encode("utf-8")) % (self.config.buckets - 1) for w in words]


BUILTIN_TEXT_ENCODERS = {"bytes": ByteTextEncoder, "words": WordTextEncoder}


PADDINGS = ("masked", "wan")


class HFTextEncoder:
    """A frozen Hugging Face text encoder from a local folder (config, weights and tokenizer files), or from a
    diffusers pipeline folder (its text_encoder/ and tokenizer/).

    padding="masked" (ours): a batch is padded to its longest caption and the mask hides the padding.
    padding="wan" (Wan2.1's convention): every caption's tokens are followed by zero vectors up to `max_length`
    (512), and the mask is all True: cross-attention sees the zeros (as projected by the DiT), as Wan was
    trained. The encoder itself still masks its padding in both."""

    def __init__(self, path: str | os.PathLike, max_length: int = 512, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, padding: str = "masked"):
        try:
            import transformers
        except ImportError as e:
            raise ImportError("HFTextEncoder needs transformers: pip install '.[text]'") from e
        if padding not in PADDINGS:
            raise ValueError(f"padding must be one of {', '.join(PADDINGS)}, got {padding!r}")
        tokenizer_path = path
        if os.path.isfile(os.path.join(path, "model_index.json")):  # a diffusers pipeline folder
            path, tokenizer_path = os.path.join(path, "text_encoder"), os.path.join(path, "tokenizer")
        if not os.path.isdir(path):
            raise FileNotFoundError(f"no text encoder at {path}: give a local folder holding a Hugging Face T5, UMT5 "
                                    f"or CLIP text model and its tokenizer (nothing is downloaded), or a built-in "
                                    f"encoder: bytes or words")
        config = transformers.AutoConfig.from_pretrained(path, local_files_only=True)
        classes = {"t5": transformers.T5EncoderModel, "umt5": transformers.UMT5EncoderModel,
                   "clip": transformers.CLIPTextModel, "clip_text_model": transformers.CLIPTextModel}
        if config.model_type not in classes:
            raise ValueError(f"{path} holds a {config.model_type!r} model; supported: {', '.join(sorted(classes))}")
        with torch.random.fork_rng(devices=[]):  # loading leaves torch's global random state as it was
            self.model = classes[config.model_type].from_pretrained(path, local_files_only=True, torch_dtype=dtype)
        self.model.to(device).eval().requires_grad_(False)
        self.tokenizer = transformers.AutoTokenizer.from_pretrained(tokenizer_path, local_files_only=True)
        self.max_length, self.padding = max_length, padding
        text_config = getattr(config, "text_config", config)
        self.dim = getattr(text_config, "d_model", None) or text_config.hidden_size
        self.device = torch.device(device)

    @torch.no_grad()
    def encode(self, captions: list[str], fixed: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
        """Tokens (B, L, dim) and mask (B, L); fixed=True pads every caption to max_length, so that its tokens do
        not depend on the other captions in its batch (sampling)."""
        batch = self.tokenizer(captions, padding="max_length" if fixed else "longest", truncation=True,
                               max_length=self.max_length,
                               return_tensors="pt").to(self.device)
        mask = batch["attention_mask"].bool()
        tokens = self.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
        tokens = tokens * mask[..., None]  # (B, L, dim), zero on the padding
        if self.padding == "wan":  # zeros up to max_length, all seen by cross-attention
            tokens = torch.nn.functional.pad(tokens, (0, 0, 0, self.max_length - tokens.shape[1]))
            return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)
        return tokens, mask

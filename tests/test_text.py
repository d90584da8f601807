"""Text encoders: the built-in byte and word encoders, and a tiny random T5 loaded from a local folder."""

from __future__ import annotations

import pytest
import torch

from dit3d import DiT3D
from dit3d.text import ByteTextConfig, ByteTextEncoder, HFTextEncoder, WordTextConfig, WordTextEncoder


def nudge_output_layer(dit: DiT3D) -> None:
    """The DiT's output layer and gates start at zero (adaLN-Zero), so at initialisation no gradient reaches the
    text through it: give them small random weights, as a few training steps would."""
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in [dit.out.weight, dit.time_modulation[1].weight, *(b.modulation for b in dit.blocks)]:
            p.copy_(torch.randn(p.shape, generator=g) * 0.05)


def test_byte_encoder_tokens_and_mask():
    enc = ByteTextEncoder(ByteTextConfig(dim=32, max_bytes=12))
    tokens, mask = enc.encode(["a red circle moving left", "hi", ""])
    assert tokens.shape == (3, 12, 32) and mask.shape == (3, 12)
    assert mask.sum(1).tolist() == [12, 2, 1]  # truncated to max_bytes; an empty caption keeps one token
    assert tokens[1, 2:].abs().max() == 0  # padding positions are zero
    # a caption's tokens do not depend on what it is batched with
    alone, _ = enc.encode(["hi"])
    torch.testing.assert_close(alone[0], tokens[1, :2], rtol=0, atol=1e-5)
    assert "é".encode() and enc.tokenize(["é"])[0].tolist() == [[0xC3, 0xA9]]


def test_byte_encoder_trains_with_the_dit_and_round_trips(tmp_path):
    torch.manual_seed(0)
    enc = ByteTextEncoder(ByteTextConfig(dim=64))
    dit = DiT3D.from_preset("tiny")
    x = torch.randn(2, 16, 1, 4, 4)
    text, mask = enc.encode(["a red circle moving left", "a blue square moving up"])
    nudge_output_layer(dit)
    dit(x, torch.rand(2), text, mask).pow(2).sum().backward()
    assert enc.embed.weight.grad.abs().sum() > 0  # gradients reach the encoder through the DiT
    enc.save_pretrained(tmp_path / "text")
    loaded = ByteTextEncoder.from_pretrained(tmp_path / "text")
    assert loaded.config == enc.config
    torch.testing.assert_close(loaded.encode(["x"])[0], enc.encode(["x"])[0])


def test_word_encoder_tokens_and_mask():
    enc = WordTextEncoder(WordTextConfig(dim=32, max_words=6, buckets=1000))
    ids, mask = enc.tokenize(["A red circle, moving LEFT", "a red", "", "one two three four five six seven"])
    assert ids.shape == (4, 6) and mask.sum(1).tolist() == [6, 2, 1, 6]  # the comma is a token; truncated to 6
    assert (ids[mask] >= 1).all() and (ids[mask] < 1000).all() and (ids[~mask] == WordTextEncoder.PAD).all()
    # a word is one id wherever it stands and whatever its case
    assert ids[0, 0] == ids[1, 0] and ids[0, 1] == ids[1, 1] and ids[0, 5] == enc.tokenize(["left"])[0][0, 0]
    assert len(set(ids[0].tolist())) == 6
    # the hashing is fixed (CRC-32), not Python's per-process salted hash(): the same ids in every process
    import zlib

    assert ids[0, 1] == 1 + zlib.crc32(b"red") % 999
    tokens, mask = enc.encode(["a red circle", "a red"])
    assert tokens[1, 2:].abs().max() == 0
    alone, _ = enc.encode(["a red"])
    torch.testing.assert_close(alone[0], tokens[1, :2], rtol=0, atol=1e-5)
    with pytest.raises(ValueError, match="buckets must be at least 2"):
        WordTextEncoder(WordTextConfig(buckets=1))


def test_word_encoder_trains_with_the_dit_and_round_trips(tmp_path):
    torch.manual_seed(0)
    enc = WordTextEncoder(WordTextConfig(dim=64))
    dit = DiT3D.from_preset("tiny")
    text, mask = enc.encode(["a red circle moving left", "a blue square moving up"])
    nudge_output_layer(dit)
    dit(torch.randn(2, 16, 1, 4, 4), torch.rand(2), text, mask).pow(2).sum().backward()
    assert enc.embed.weight.grad.abs().sum() > 0
    enc.save_pretrained(tmp_path / "text")
    loaded = WordTextEncoder.from_pretrained(tmp_path / "text")
    assert loaded.config == enc.config
    torch.testing.assert_close(loaded.encode(["a red x"])[0], enc.encode(["a red x"])[0])
    with pytest.raises(ValueError, match="text-words"):  # a word encoder's folder is not a byte encoder's
        ByteTextEncoder.from_pretrained(tmp_path / "text")


@pytest.fixture(scope="module")
def tiny_t5(tmp_path_factory):
    transformers = pytest.importorskip("transformers")
    tokenizers = pytest.importorskip("tokenizers")
    path = tmp_path_factory.mktemp("tiny_t5")
    words = ["a", "red", "green", "blue", "circle", "square", "moving", "left", "right", "up", "down"]
    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    torch.manual_seed(0)
    config = transformers.T5Config(vocab_size=len(vocab), d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                                   pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
    transformers.T5EncoderModel(config).save_pretrained(path)
    return path


def test_t5_from_a_local_folder(tiny_t5):
    rng = torch.get_rng_state()
    enc = HFTextEncoder(tiny_t5, max_length=16)
    assert torch.equal(torch.get_rng_state(), rng)  # loading draws nothing from the global generator
    assert enc.dim == 32
    tokens, mask = enc.encode(["a red circle moving left", "a blue square"])
    assert tokens.shape == (2, 5, 32) and mask.sum(1).tolist() == [5, 3]
    assert tokens[1, 3:].abs().max() == 0
    assert not any(p.requires_grad for p in enc.model.parameters())  # frozen
    # padding does not change the real tokens (T5 masks it in self-attention)
    alone, _ = enc.encode(["a blue square"])
    torch.testing.assert_close(alone[0], tokens[1, :3], rtol=1e-5, atol=1e-5)
    # and the DiT accepts its tokens
    dit = DiT3D.from_preset("tiny", text_dim=32)
    assert dit(torch.randn(2, 16, 1, 4, 4), torch.rand(2), tokens, mask).shape == (2, 16, 1, 4, 4)


def test_missing_text_encoder_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="no text encoder at .*nowhere: give a local folder"):
        HFTextEncoder(tmp_path / "nowhere")

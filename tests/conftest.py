"""Shared fixtures: the real clips shipped in tests/assets, synthetic shards, and broken files."""

from __future__ import annotations

import shutil
import tarfile
from pathlib import Path

import av
import numpy as np
import pytest
import torch

from cpu_math import strict_cpu_math
from data.synthetic import SyntheticSpec, generate

ASSETS = Path(__file__).parent / "assets"
CLIPS = ASSETS / "clips"
BIKES = CLIPS / "bikes.mp4"  # 640x272, 250 frames at 25 fps, keyframes at 0, 30, 76, 137, 187, 242
CARPHONE = CLIPS / "carphone_pristine.mp4"  # 176x144, 120 frames at 29.97 fps, one keyframe

# as every command does before its first matrix product, so the test process computes as the commands do
strict_cpu_math()


@pytest.fixture(scope="session")
def synthetic_shards(tmp_path_factory) -> Path:
    """24 synthetic clips (17 frames, 64x64, 8 fps) in 6 shards of 4."""
    out = tmp_path_factory.mktemp("synthetic")
    generate(out, 24, SyntheticSpec(), seed=0, shard_size=4)
    return out


def write_faststart_mp4(path: Path, frames: int, size: int = 32, fps: int = 8) -> Path:
    """An mp4 with its index first (as streaming sites serve them), of noise frames."""
    with av.open(str(path), "w", options={"movflags": "faststart"}) as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = size, size, "yuv420p"
        for i in range(frames):
            f = np.random.default_rng(i).integers(0, 255, (size, size, 3), dtype=np.uint8)
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())
    return path


def tar_members(path: Path) -> dict[str, bytes]:
    """A shard's members by name."""
    with tarfile.open(path) as tar:
        return {m.name: tar.extractfile(m).read() for m in tar.getmembers()}


def truncated_copy(src: Path, dst: Path, fraction: float = 0.6) -> Path:
    data = src.read_bytes()
    dst.write_bytes(data[: int(len(data) * fraction)])
    return dst


def copy_clip(src: Path, dst: Path, caption: str | None) -> Path:
    shutil.copyfile(src, dst)
    if caption is not None:
        dst.with_suffix(".txt").write_text(caption + "\n")
    return dst


def write_reference_lpips_weights(folder: Path):
    """The `lpips` package's VGG model with a randomly initialised backbone (nothing is downloaded) and
    the linear heads shipped in its wheel, plus its weights written in the two formats our loader reads:
    torchvision's VGG16 state dict and the package's head file. Returns (model, vgg_path, heads_path)."""
    import os

    import lpips
    import torch

    ref = lpips.LPIPS(net="vgg", pnet_rand=True, verbose=False).eval()
    vgg = {}
    for slice_ in (ref.net.slice1, ref.net.slice2, ref.net.slice3, ref.net.slice4, ref.net.slice5):
        for name, module in slice_.named_children():  # children are named by torchvision's feature index
            for k, v in module.state_dict().items():
                vgg[f"features.{name}.{k}"] = v
    vgg["classifier.0.weight"] = torch.zeros(2, 2)  # a full torchvision file has more keys: ignored
    torch.save(vgg, folder / "vgg16.pth")
    heads = Path(os.path.dirname(lpips.__file__)) / "weights" / "v0.1" / "vgg.pth"
    return ref, folder / "vgg16.pth", heads


class TinyI3D(torch.nn.Module):
    """The call signature of the TorchScript I3D, with random weights and 16 features."""

    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv3d(3, 8, 3, stride=(1, 4, 4))
        self.fc = torch.nn.Linear(8, 16)

    def forward(self, x: torch.Tensor, rescale: bool = False, resize: bool = False, return_features: bool = True) -> torch.Tensor:
        assert x.shape[-2:] == (224, 224)
        return self.fc(torch.relu(self.conv(x)).mean(dim=(2, 3, 4)))


@pytest.fixture(scope="session")
def i3d_path(tmp_path_factory):
    """A tiny random I3D saved as TorchScript, the form the field's detector comes in."""
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("i3d") / "tiny_i3d.pt"
    torch.jit.script(TinyI3D()).save(str(path))
    return path


def write_word_tokenizer(path: Path, words: list[str]):
    """A word-level fast tokenizer (no download, no sentencepiece model) for tiny T5 / UMT5 encoders."""
    import tokenizers
    import transformers

    vocab = {"<pad>": 0, "</s>": 1, "<unk>": 2} | {w: i + 3 for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>", unk_token="<unk>")
    fast.save_pretrained(path)
    return fast, len(vocab)


WAN_WORDS = ["a", "red", "green", "blue", "circle", "square", "triangle", "moving", "left", "right", "up", "down",
             "blurry", "static"]


@pytest.fixture(scope="session")
def wan_pipeline(tmp_path_factory) -> Path:
    """A whole diffusers Wan pipeline folder of tiny random models: transformer (latent 4, text 24), AutoencoderKLWan
    (8x in space, 4x in time, 4 latent channels), UMT5 and its tokenizer, FlowMatchEulerDiscreteScheduler(shift 3)."""
    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("wan") / "Wan2.1-T2V-tiny"
    tokenizer, vocab = write_word_tokenizer(tmp_path_factory.mktemp("wan_tok"), WAN_WORDS)
    torch.manual_seed(0)
    text_encoder = transformers.UMT5EncoderModel(transformers.UMT5Config(
        vocab_size=vocab, d_model=24, d_kv=8, d_ff=48, num_layers=2, num_heads=3, pad_token_id=0, eos_token_id=1,
        decoder_start_token_id=0)).eval()
    transformer = diffusers.WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=4, out_channels=4, text_dim=24,
        freq_dim=256, ffn_dim=40, num_layers=2, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=64).eval()
    with torch.no_grad():  # away from the initial values, so that no part of it is the identity or zero
        for p in transformer.parameters():
            p.add_(0.2 * torch.randn_like(p))
    vae = diffusers.AutoencoderKLWan(base_dim=8, z_dim=4, dim_mult=[1, 2, 2, 2], num_res_blocks=1,
                                     temperal_downsample=[False, True, True], latents_mean=[0.1, -0.2, 0.3, 0.0],
                                     latents_std=[1.5, 0.5, 2.0, 1.0]).eval()
    scheduler = diffusers.FlowMatchEulerDiscreteScheduler(shift=3.0)
    diffusers.WanPipeline(tokenizer=tokenizer, text_encoder=text_encoder, transformer=transformer, vae=vae,
                          scheduler=scheduler).save_pretrained(root)
    return root


def save_tiny_vae(path: Path) -> Path:
    """The tiny tokenizer the DiT tests train on: seeded initial weights, latent stats mean 0 and std 2."""
    from tokenizer import CausalVAE, save_vae

    torch.manual_seed(0)
    vae = CausalVAE.from_preset("tiny")
    vae.set_latent_stats(torch.zeros(16), torch.full((16,), 2.0))
    save_vae(vae, path)
    return path


def write_tiny_dit_inputs(root: Path, clips: int = 16, size: int = 48) -> None:
    """What a tiny DiT run reads: ROOT/shards (synthetic clips of 9 frames, in shards of 8) and ROOT/vae."""
    generate(root / "shards", clips, SyntheticSpec(frames=9, size=size), seed=0, shard_size=8)
    save_tiny_vae(root / "vae")


PREFERENCE_PROMPTS = ["bikes ride past", "a man talks in a car", "a street at noon"]


def write_sample_folders(root: Path, prompts: list[str] = PREFERENCE_PROMPTS, seeds: int = 2) -> tuple[Path, Path]:
    """Two models' sample folders as sample.py writes them (NAME.mp4 + NAME.txt, the same prompts and seeds):
    windows of the shipped clips (17 frames, 64x96, 8 fps) in A, the same windows at half contrast in B."""
    from data import read_video, write_video
    from data.sources import video_name

    a, b = root / "A", root / "B"
    a.mkdir(parents=True), b.mkdir(parents=True)
    for k, prompt in enumerate(prompts):
        for seed in range(seeds):
            clip = (BIKES, CARPHONE)[k % 2]
            video = read_video(clip, 17, size=(64, 96), start=(20 * seed + 30 * k) % 80)
            name = video_name(prompt, seed)
            for folder, v in ((a, video), (b, video * 0.5)):
                write_video(folder / f"{name}.mp4", v, fps=8)
                (folder / f"{name}.txt").write_text(prompt + "\n")
    return a, b


@pytest.fixture(scope="session")
def sample_folders(tmp_path_factory) -> tuple[Path, Path]:
    return write_sample_folders(tmp_path_factory.mktemp("samples"))


def write_tiny_clip(folder: Path, captions: list[str]) -> Path:
    """A tiny random transformers CLIP (16-wide embeddings, 32x32 images) with a word-level tokenizer over the
    captions' words and its image processor, as save_pretrained writes them."""
    import tokenizers
    import transformers

    words = sorted({w for c in captions for w in c.split()})
    vocab = {"<pad>": 0, "<unk>": 1, "<|startoftext|>": 2, "<|endoftext|>": 3} | {w: i + 4 for i, w in enumerate(words)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    tok.post_processor = tokenizers.processors.TemplateProcessing(
        single="<|startoftext|> $A <|endoftext|>", special_tokens=[("<|startoftext|>", 2), ("<|endoftext|>", 3)])
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>",
                                                bos_token="<|startoftext|>", eos_token="<|endoftext|>")
    config = transformers.CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, max_position_embeddings=16, eos_token_id=3, bos_token_id=2, pad_token_id=0),
        vision_config=dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=16)
    torch.manual_seed(0)
    transformers.CLIPModel(config).save_pretrained(folder)
    fast.save_pretrained(folder)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(folder)
    return folder

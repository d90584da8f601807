"""Fine-tuning the field's open models, each step held against diffusers on tiny random models saved with
save_pretrained: UMT5 as Wan pads it, a whole Wan pipeline through sample.py, and LoRA (peft) trained by
train.py, loaded by diffusers' own LoRA loader, merged, and resumed."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import torch.distributed.checkpoint as dcp

import sample
import train
from dit3d import DiT3D, load_dit
from dit3d.lora import ADAPTER_FILE, load_adapter
from dit3d.text import HFTextEncoder
from errors import InputError
from pipeline import Pipeline
from tests.test_train import losses, one_line_error, run_cli
from tokenizer import save_vae

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

PROMPTS = ["a red circle moving left", "a blue square moving up"]
FAST = ["--frames", "5", "--size", "32", "--wandb", "disabled", "--no-progress", "--warmup", "2", "--log-every", "1",
        "--preview-steps", "2", "--num-workers", "0"]


@pytest.fixture(scope="module")
def diffusers_pipe(wan_pipeline):
    return diffusers.WanPipeline.from_pretrained(wan_pipeline)


def test_umt5_padded_as_wan_equals_wan_pipeline_embeddings(wan_pipeline, diffusers_pipe):
    enc = HFTextEncoder(wan_pipeline, padding="wan")  # a pipeline folder: its text_encoder/ and tokenizer/
    tokens, mask = enc.encode(PROMPTS)
    expected, _ = diffusers_pipe.encode_prompt(PROMPTS, do_classifier_free_guidance=False, max_sequence_length=512)
    assert tokens.shape == expected.shape == (2, 512, 24) and bool(mask.all())
    assert (tokens - expected).abs().max().item() <= 1e-6
    assert tokens[0, 5:].abs().max() == 0 and tokens[0, :5].abs().min() > 0  # five words, then zeros that count
    masked, masked_mask = HFTextEncoder(wan_pipeline).encode(PROMPTS)  # ours: padded to the longest, masked
    assert masked.shape[1] == 5 and torch.equal(masked, tokens[:, :5])


def test_sample_py_gives_wan_pipelines_video(wan_pipeline, diffusers_pipe, tmp_path):
    ours = Pipeline.load(wan_pipeline)
    assert ours.defaults["frames"] == 81 and ours.defaults["size"] == [480, 832] and ours.flow.shift == 3.0
    frames, height, width, seed, steps = 9, 32, 48, 7, 4
    z = ours.generate([PROMPTS[0]], frames, height, width, steps=steps, guidance=5.0, seeds=[seed],
                      negative="blurry static")
    video = (ours.decode(z)[0] + 1) / 2  # (3, T, H, W) in [0, 1]
    noise = torch.randn((1, 4, 3, 4, 6), generator=torch.Generator().manual_seed(seed))  # ours draws it so too
    expected = diffusers_pipe(prompt=PROMPTS[0], negative_prompt="blurry static", height=height, width=width,
                              num_frames=frames, num_inference_steps=steps, guidance_scale=5.0, latents=noise,
                              output_type="np").frames[0]  # (T, H, W, 3)
    got = video.permute(1, 2, 3, 0).numpy()
    assert got.shape == expected.shape
    assert np.abs(got - expected).max() <= 1e-4
    assert expected.std() > 0.01
    # and the command runs it: Wan's defaults, overridden here to keep it small
    out = tmp_path / "clip.mp4"
    assert sample.main(["--ckpt", str(wan_pipeline), "--prompt", PROMPTS[0], "--frames", "9", "--height", "32",
                        "--width", "48", "--steps", "2", "--out", str(out), "--no-progress"]) == 0
    assert out.stat().st_size > 0


@pytest.mark.parametrize("scheduler", ["UniPCMultistepScheduler", "DPMSolverMultistepScheduler"])
def test_a_wan_folder_samples_with_its_own_scheduler(wan_pipeline, tmp_path, scheduler):
    """Wan2.1's diffusers folders ship UniPC (flow sigmas, shift 3 or 5): ours reads it from the folder and gives
    WanPipeline's video with it, step for step on its grid and integer timesteps."""
    root = tmp_path / "wan"
    shutil.copytree(wan_pipeline, root)
    getattr(diffusers, scheduler)(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=3.0,
                                  solver_order=2).save_pretrained(root / "scheduler")
    index = json.loads((root / "model_index.json").read_text())
    (root / "model_index.json").write_text(json.dumps(index | {"scheduler": ["diffusers", scheduler]}))
    ours = Pipeline.load(root)
    assert ours.defaults["sampler"]["solver"] == {"UniPCMultistepScheduler": "unipc"}.get(scheduler, "dpm++")
    frames, height, width, seed, steps = 9, 32, 48, 3, 5
    z = ours.generate([PROMPTS[1]], frames, height, width, steps=steps, guidance=5.0, seeds=[seed],
                      negative="blurry static", solver=ours.defaults["sampler"]["solver"])
    got = ((ours.decode(z)[0] + 1) / 2).permute(1, 2, 3, 0).numpy()
    noise = torch.randn((1, 4, 3, 4, 6), generator=torch.Generator().manual_seed(seed))
    expected = diffusers.WanPipeline.from_pretrained(root)(
        prompt=PROMPTS[1], negative_prompt="blurry static", height=height, width=width, num_frames=frames,
        num_inference_steps=steps, guidance_scale=5.0, latents=noise, output_type="np").frames[0]
    assert got.shape == expected.shape and expected.std() > 0.01
    assert np.abs(got - expected).max() <= 1e-4


def test_a_wan_transformer_alone_needs_its_vae_and_text_encoder(wan_pipeline, capsys):
    assert sample.main(["--ckpt", str(wan_pipeline / "transformer"), "--prompt", "a red circle", "--out", "x.mp4",
                        "--no-progress"]) == 2
    assert one_line_error(capsys, "is a Wan transformer alone: give its VAE")


def lora_args(wan_pipeline, shards, out, *extra):
    return ["--stage", "dit", "--data", str(shards), "--init", str(wan_pipeline), "--vae", str(wan_pipeline / "vae"),
            "--text-encoder", str(wan_pipeline), "--out", str(out), "--lr", "1e-2", *FAST, *extra]


@pytest.fixture(scope="module")
def lora_run(wan_pipeline, synthetic_shards, tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    common = ["--steps", "4", "--batch-size", "2", "--lora-rank", "4", "--lora-alpha", "8", "--lora-targets",
              "qkv,proj,q,kv,fc1,fc2", "--checkpoint-every", "2", "--lora-merge"]
    assert train.main(lora_args(wan_pipeline, synthetic_shards, out, *common)) == 0
    return out, common


def test_lora_adapter_loads_into_diffusers_and_gives_our_output(lora_run, wan_pipeline):
    run, _ = lora_run
    adapter = run / "model" / "lora" / ADAPTER_FILE
    assert adapter.is_file() and all(k.startswith("transformer.blocks.") for k in load_file(adapter))
    pipe = diffusers.WanPipeline.from_pretrained(wan_pipeline)
    pipe.load_lora_weights(str(adapter.parent))  # the pipeline's own LoRA loader, on the folder as exported
    theirs = pipe.transformer.eval()
    base = load_dit(wan_pipeline).eval()
    ours = load_adapter(load_dit(wan_pipeline), run / "model" / "lora").eval()
    merged = load_dit(run / "model" / "dit").eval()  # --lora-merge
    g = torch.Generator().manual_seed(3)
    x, t, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([0.2, 0.7]), torch.randn(2, 512, 24, generator=g)
    with torch.no_grad():
        expected = theirs(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text, return_dict=False)[0]
        got, plain, folded = ours(x, t, text), base(x, t, text), merged(x, t, text)
    assert (got - expected).abs().max().item() <= 1e-5
    assert (folded - got).abs().max().item() <= 1e-5
    assert (got - plain).abs().max().item() > 1e-3, (got - plain).abs().max()  # the adapter was trained
    # the run's model folder samples (base + adapter, merged on load)
    assert Pipeline.load(run).model.dit.config == base.config


def test_a_four_step_lora_student_of_wan_loads_in_diffusers(wan_pipeline, synthetic_shards, tmp_path):
    """train.py --stage distill --lora-rank: the student as adapters on Wan2.1 (the form its 4-step LoRAs ship
    in), loaded by WanPipeline's own LoRA loader; its run folder samples in 4 steps at guidance 1."""
    out = tmp_path / "student"
    args = lora_args(wan_pipeline, synthetic_shards, out, "--steps", "2", "--batch-size", "2", "--lora-rank", "4",
                     "--checkpoint-every", "0", "--distill-steps", "4", "--teacher-steps", "8")
    args[args.index("dit")] = "distill"
    assert train.main(args) == 0
    adapter = out / "model" / "lora" / ADAPTER_FILE
    pipe = diffusers.WanPipeline.from_pretrained(wan_pipeline)
    pipe.load_lora_weights(str(adapter.parent))
    ours = load_adapter(load_dit(wan_pipeline), out / "model" / "lora").eval()
    g = torch.Generator().manual_seed(5)
    x, t, text = torch.randn(2, 4, 2, 4, 4, generator=g), torch.tensor([0.3, 0.9]), torch.randn(2, 512, 24, generator=g)
    with torch.no_grad():
        expected = pipe.transformer.eval()(hidden_states=x, timestep=1000 * t, encoder_hidden_states=text,
                                           return_dict=False)[0]
        got, plain = ours(x, t, text), load_dit(wan_pipeline).eval()(x, t, text)
    assert (got - expected).abs().max().item() <= 1e-5 and (got - plain).abs().max().item() > 1e-4
    student = Pipeline.load(out)
    assert student.defaults["sampler"]["steps"] == 4 and student.defaults["sampler"]["guidance"] == 1.0


def test_lora_trains_only_the_adapters_and_checkpoints_only_them(lora_run):
    run, _ = lora_run
    ckpt = run / "checkpoints" / "step_00000004"
    keys = list(dcp.FileSystemReader(str(ckpt)).read_metadata().state_dict_metadata)
    model_keys = [k for k in keys if k.startswith("model.")]
    assert model_keys and all("lora_" in k for k in model_keys), model_keys[:5]
    assert all("lora_" in k or k.endswith("n_averaged") for k in keys if k.startswith("ema."))
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["lora"]["rank"] == 4


def test_a_resumed_lora_run_continues_the_uninterrupted_loss_curve(lora_run, wan_pipeline, synthetic_shards, tmp_path,
                                                                    capsys):
    whole, common = lora_run
    split = tmp_path / "split"
    assert train.main(lora_args(wan_pipeline, synthetic_shards, split, *common, "--exit-after", "2")) == 0
    assert train.main(lora_args(wan_pipeline, synthetic_shards, split, *common)) == 0  # a fresh trainer resumes
    assert "resuming" in capsys.readouterr().err
    a, b = losses(whole), losses(split)
    assert a.keys() == b.keys() == {1, 2, 3, 4}
    assert [b[k] for k in (3, 4)] == pytest.approx([a[k] for k in (3, 4)], rel=1e-5)
    ta, tb = load_file(whole / "model" / "lora" / ADAPTER_FILE), load_file(split / "model" / "lora" / ADAPTER_FILE)
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=1e-6)


def test_fine_tuning_bad_input(lora_run, wan_pipeline, synthetic_shards, tmp_path, capsys):
    run, _ = lora_run
    # a LoRA made for another model
    other = DiT3D.from_preset("tiny", in_channels=4, text_dim=24)
    with pytest.raises(InputError, match="made for another model"):
        load_adapter(other, run / "model" / "lora")
    # Wan's padding with a built-in text encoder
    assert train.main(["--stage", "dit", "--data", str(synthetic_shards), "--init", str(wan_pipeline), "--vae",
                       str(wan_pipeline / "vae"), "--out", str(tmp_path / "bytes"), "--text-padding", "wan", *FAST,
                       "--steps", "1"]) == 2
    assert one_line_error(capsys, "Wan2.1's convention for a T5 / UMT5 encoder")
    # an --init folder in neither format
    (tmp_path / "neither").mkdir()
    (tmp_path / "neither" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    args = lora_args(wan_pipeline, synthetic_shards, tmp_path / "x", "--steps", "1")
    args[args.index("--init") + 1] = str(tmp_path / "neither")
    assert train.main(args) == 2
    assert one_line_error(capsys, "holds a UNet2DModel, neither a DiT checkpoint of ours nor a Wan transformer")


def test_a_text_encoder_of_another_width_is_refused(wan_pipeline, synthetic_shards, tmp_path, capsys):
    import transformers

    from tests.conftest import WAN_WORDS, write_word_tokenizer

    folder = tmp_path / "t5"
    _, vocab = write_word_tokenizer(folder, WAN_WORDS)
    transformers.T5EncoderModel(transformers.T5Config(vocab_size=vocab, d_model=32, d_kv=8, d_ff=64, num_layers=1,
                                                      num_heads=4, decoder_start_token_id=0)).save_pretrained(folder)
    args = lora_args(wan_pipeline, synthetic_shards, tmp_path / "x", "--steps", "1")
    args[args.index("--text-encoder") + 1] = str(folder)
    assert train.main(args) == 2
    assert one_line_error(capsys, "gives 32-wide tokens but the DiT at .* takes 24")


@pytest.mark.slow
def test_wan_fine_tuning_under_fsdp2_and_sequence_parallelism_equals_one_process(wan_pipeline, synthetic_shards,
                                                                                  tmp_path):
    """LoRA sharded by FSDP2 over 2 ranks x 2 clips, and full fine-tuning with each clip's tokens split over 2
    ranks (Ulysses), each against one process with the same global batch."""
    lora = ["--steps", "3", "--batch-size", "2", "--checkpoint-every", "0", "--lora-rank", "4", "--lora-targets",
            "qkv,proj,q,kv,fc1,fc2"]
    assert train.main(lora_args(wan_pipeline, synthetic_shards, tmp_path / "one", *lora, "--grad-accum", "2",
                                "--num-workers", "2")) == 0
    run_cli(lora_args(wan_pipeline, synthetic_shards, tmp_path / "fsdp", *lora, "--parallel", "fsdp", "--num-workers",
                      "1"), nproc=2)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "fsdp")
    assert a.keys() == b.keys() == {1, 2, 3} and [b[k] for k in a] == pytest.approx([a[k] for k in a], rel=1e-5)
    ta, tb = (load_file(tmp_path / r / "model" / "lora" / ADAPTER_FILE) for r in ("one", "fsdp"))
    for k in ta:
        torch.testing.assert_close(ta[k], tb[k], rtol=1e-4, atol=1e-5, msg=k)

    full = ["--steps", "3", "--batch-size", "2", "--checkpoint-every", "0", "--lr", "1e-3"]
    assert train.main(lora_args(wan_pipeline, synthetic_shards, tmp_path / "whole", *full)) == 0
    run_cli(lora_args(wan_pipeline, synthetic_shards, tmp_path / "sp", *full, "--sp-size", "2"), nproc=2)
    a, b = losses(tmp_path / "whole"), losses(tmp_path / "sp")
    assert a.keys() == b.keys() == {1, 2, 3} and [b[k] for k in a] == pytest.approx([a[k] for k in a], rel=1e-5)
    da, db = (load_file(tmp_path / r / "model" / "dit" / "model.safetensors") for r in ("whole", "sp"))
    for k in da:
        torch.testing.assert_close(da[k], db[k], rtol=1e-4, atol=1e-5, msg=k)
    start = load_dit(wan_pipeline).state_dict()
    assert any(not torch.equal(start[k], da[k]) for k in da if k != "null_text")  # full fine-tuning moved the weights


def test_fine_tuning_a_run_of_ours_starts_from_its_dit_and_its_text_encoder(tmp_path):
    """--init a train.py run (built-in text encoder): LoRA starts from the run's DiT and keeps its trained text
    encoder frozen; the tuned model samples (base + adapter)."""
    from tests.test_train import dit_args

    from data.synthetic import SyntheticSpec, generate

    shards = tmp_path / "shards"
    generate(shards, 8, SyntheticSpec(frames=9, size=48), seed=0, shard_size=4)
    torch.manual_seed(0)
    vae = tmp_path / "vae"
    from tokenizer import CausalVAE

    save_vae(CausalVAE.from_preset("tiny"), vae)
    common = ["--batch-size", "2", "--checkpoint-every", "0", "--num-workers", "0", "--preview-steps", "1"]
    assert train.main(dit_args(shards, vae, tmp_path / "base", "--steps", "2", *common)) == 0
    assert train.main(dit_args(shards, vae, tmp_path / "tuned", "--steps", "2", "--init", str(tmp_path / "base"),
                               "--lora-rank", "2", *common)) == 0
    a, b = (load_file(tmp_path / r / "model" / "text" / "model.safetensors") for r in ("base", "tuned"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    pipe = Pipeline.load(tmp_path / "tuned")
    base = load_dit(tmp_path / "base" / "model" / "dit")
    assert pipe.model.dit.config == base.config
    moved = [k for k, v in base.state_dict().items() if not torch.equal(v, pipe.model.dit.state_dict()[k])]
    assert moved and all(k.endswith(("qkv.weight", "proj.weight", ".q.weight", "kv.weight")) for k in moved)

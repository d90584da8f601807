"""The house rules that a user or a contributor relies on without seeing: the libraries import without the data
stack; bad input is one line and a bug keeps its traceback; FSDP2 computes in bf16 on CUDA; a resumed run
draws the random numbers the uninterrupted one would have; the GAN weight is VQGAN's."""

from __future__ import annotations

import json
import random
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def test_the_model_libraries_import_without_the_data_stack():
    """`import dit3d` and `import tokenizer` (and loading their checkpoints) need torch and safetensors only:
    not PyAV, webdataset or the loader."""
    code = ("import sys, dit3d, tokenizer, checkpoint_io; from dit3d import DiT3D; from tokenizer import CausalVAE; "
            "print(sorted(m for m in ('av', 'webdataset', 'data', 'braceexpand') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, check=True).stdout
    assert json.loads(out.strip().replace("'", '"')) == []


def test_a_restored_rng_state_draws_what_the_saved_one_would_have():
    from training.checkpoint import rng_state, set_rng_state

    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    for _ in range(5):  # move every stream off its start, NumPy's mid-way through its 624-word block
        torch.rand(3), random.random(), np.random.rand(7), np.random.randn()
    state = json.loads(json.dumps(rng_state(torch.device("cpu"))))  # as it goes through rank{r}.json
    expected = (torch.rand(4), random.random(), np.random.rand(5), np.random.randn(3))
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    set_rng_state(state, torch.device("cpu"))
    again = (torch.rand(4), random.random(), np.random.rand(5), np.random.randn(3))
    assert torch.equal(expected[0], again[0]) and expected[1] == again[1]
    assert np.array_equal(expected[2], again[2]) and np.array_equal(expected[3], again[3])


def test_fsdp2_computes_in_bf16_on_cuda_and_reduces_in_float32(monkeypatch):
    """parallelize() gives FSDP2 a bf16 parameter dtype on CUDA (float32 gradient reduction), and none on the
    CPU; every block and the root get the same policy. fully_shard is replaced by a recorder, so no GPU is
    needed: what is checked is what training asks FSDP2 for."""
    import torch.distributed as dist
    import torch.distributed.fsdp as fsdp

    from dit3d import DiT3D
    from dit3d.model import DiTBlock
    from parallel import Env, ParallelOptions, parallelize

    calls = []
    monkeypatch.setattr(fsdp, "fully_shard", lambda module, mp_policy: calls.append((type(module), mp_policy)))
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    model = DiT3D.from_preset("tiny")
    for device, dtype in (("cuda", torch.bfloat16), ("cpu", None)):
        calls.clear()
        env = Env(rank=0, world=2, local_rank=0, device=torch.device(device))
        assert parallelize(model, env, ParallelOptions((DiTBlock,), "fsdp")) is model
        assert [t for t, _ in calls] == [DiTBlock] * 4 + [DiT3D]
        assert all(p.param_dtype == dtype and p.reduce_dtype == torch.float32 for _, p in calls)


def test_the_gan_weight_is_the_gradient_ratio_at_the_decoders_last_weight(tmp_path):
    """VQGAN's adaptive weight: ||d rec / d W|| / ||d gan / d W|| at the decoder's last layer's weight W."""
    from data.synthetic import SyntheticSpec, generate
    from parallel import Env
    from tokenizer.losses import reconstruction_loss
    from training.options import build_parser
    from training.stage import sample_generator
    from training.tokenizer_stage import TokenizerStage

    generate(tmp_path / "shards", 4, SyntheticSpec(frames=5, size=32), seed=0, shard_size=4)
    args = build_parser().parse_args(["--stage", "tokenizer", "--data", str(tmp_path / "shards"), "--out", str(tmp_path),
                                      "--frames", "5", "--size", "32", "--disc-weight", "0.5", "--disc-start", "0"])
    torch.manual_seed(0)
    stage = TokenizerStage(args, Env(rank=0, world=1, local_rank=0, device=torch.device("cpu")))
    batch = {"video": torch.rand(2, 3, 5, 32, 32) * 2 - 1, "key": ["a", "b"]}
    _, logs = stage.loss(stage.model, batch, step=0)

    recon, posterior = stage.model(batch["video"], generator=sample_generator(0, 0, "a", "posterior"))
    rec, _, _ = reconstruction_loss(batch["video"], recon, posterior, stage.loss_cfg)
    gan = -stage.disc(recon).mean()
    weight = stage.model.decoder.conv_out.conv.weight
    rec_grad, = torch.autograd.grad(rec, weight, retain_graph=True)
    gan_grad, = torch.autograd.grad(gan, weight)
    assert logs["adaptive_weight"] == pytest.approx(float(rec_grad.norm() / (gan_grad.norm() + 1e-4)), rel=1e-4)


def test_bad_input_is_one_line_and_a_bug_keeps_its_traceback(tmp_path, monkeypatch, capsys):
    import train

    assert train.main(["--stage", "dit", "--data", str(tmp_path), "--out", str(tmp_path / "run"), "--frames", "6"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --frames must be 1 + 4k") and err.count("\n") == 1

    def broken(args):
        raise ValueError("an internal invariant broke")  # a bug, not the user's input

    monkeypatch.setattr(train, "train", broken)
    with pytest.raises(ValueError, match="an internal invariant broke"):
        train.main(["--stage", "dit", "--data", str(tmp_path), "--out", str(tmp_path / "run")])


def _project_modules() -> dict[str, Path]:
    """The project's own modules (libraries, commands, entry points; not tests or benches), by dotted name."""
    mods = {}
    for path in ROOT.rglob("*.py"):
        rel = path.relative_to(ROOT)
        if rel.parts[0] in ("tests", "bench") or rel.parts[0].startswith("."):
            continue
        name = ".".join(rel.with_suffix("").parts).removesuffix(".__init__")
        mods[name] = path
    return mods


def _imports(name: str, path: Path, mods: dict[str, Path]) -> set[str]:
    """The project modules `name` imports, at the top or inside a function (a lazy import is still a dependency)."""
    import ast

    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - (node.level - 1)] if package else []
                base = ".".join(parts + ([base] if base else []))
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in mods else base for a in node.names]
        else:
            continue
        for target in targets:
            while target and target not in mods:
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def test_no_import_circle_between_the_projects_modules():
    """Import circles hide which idea depends on which; each one found is named with its members."""
    mods = _project_modules()
    graph = {m: _imports(m, p, mods) for m, p in mods.items()}
    index, low, stack, on_stack, circles = {}, {}, [], set(), []

    def visit(v):  # Tarjan's strongly connected components
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in graph[v]:
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                circles.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    assert not circles, f"import circles: {circles}"


def test_the_dependency_rules_hold():
    """dit3d and tokenizer never import each other, and neither imports the trainer, the pipeline or the commands
    that compose them (evaluation's metrics they may use: tokenizer.evaluate reports with them)."""
    mods = _project_modules()
    composers = ("training", "pipeline", "sample", "train", "quickstart")
    for lib, other in (("dit3d", "tokenizer"), ("tokenizer", "dit3d")):
        for name, path in mods.items():
            if name == lib or name.startswith(lib + "."):
                bad = [m for m in _imports(name, path, mods) if m.split(".")[0] in (other, *composers)]
                assert not bad, f"{name} imports {bad}"


def test_no_source_file_is_over_500_lines():
    """A file holds one idea; past 500 lines it holds several (tests and benches aside)."""
    long = {str(p.relative_to(ROOT)): n for p in _project_modules().values()
            if (n := len(p.read_text().splitlines())) > 500}
    assert not long, f"split these along the ideas they hold: {long}"


def test_every_source_file_is_on_the_design_page():
    """docs/design.md's layout names every module (or its package's row), so the map and the code agree."""
    design = (ROOT / "docs" / "design.md").read_text()
    missing = [str(p.relative_to(ROOT)) for p in _project_modules().values() if p.name != "__init__.py"
               and f"`{p.relative_to(ROOT)}`" not in design and f"| `{p.parent.relative_to(ROOT)}/` |" not in design]
    assert not missing, f"add to docs/design.md's layout: {missing}"

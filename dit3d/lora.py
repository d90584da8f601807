"""LoRA adapters on a DiT3D, through peft (the library the field uses), and in the format diffusers loads.

    add_lora(dit, LoraSettings(rank=16, alpha=16))     # peft injects adapters in place; the rest is frozen
    save_adapter(dit, "lora/")                         # pytorch_lora_weights.safetensors, diffusers' Wan names
    pipe.load_lora_weights("lora/")                    # ...which diffusers' WanPipeline loads as is
    load_adapter(dit, "lora/")                         # and we load back (sample.py, evaluation)
    plain = merged(dit)                                # a DiT3D with the adapters folded into its weights

Target modules are our layer names: `qkv` (self-attention's fused q, k, v), `proj` (both attentions'
outputs), `q` and `kv` (cross-attention), `fc1` and `fc2` (the MLP). Exported, each becomes the diffusers layer
(or layers) it computes: a fused layer's update B A is cut into row blocks, B_q A, B_k A and B_v A, which is
three LoRA layers sharing A, exact. The scale alpha / rank is folded into B, so the file means the same thing
to any loader, whatever alpha it assumes. A file whose layers or shapes are not this model's is an error that
says which.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn as nn
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from checkpoint_io import atomic_path
from errors import InputError, MissingInputError

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' load_lora_weights looks for
TARGETS = ("qkv", "proj", "q", "kv", "fc1", "fc2")
# our layer -> (diffusers layer, row blocks it splits into)
_DIFFUSERS = {"attn.qkv": ("attn1.to_{}", "qkv"), "attn.proj": ("attn1.to_out.0", None),
              "cross.q": ("attn2.to_q", None), "cross.kv": ("attn2.to_{}", "kv"), "cross.proj": ("attn2.to_out.0", None),
              "mlp.fc1": ("ffn.net.0.proj", None), "mlp.fc2": ("ffn.net.2", None)}


@dataclass(frozen=True)
class LoraSettings:
    rank: int = 16
    alpha: float | None = None  # None: the rank (scale 1)
    dropout: float = 0.0
    targets: tuple[str, ...] = ("qkv", "proj", "q", "kv")  # every attention projection, as finetrainers' default

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if self.rank < 1:
            raise InputError(f"--lora-rank must be at least 1, got {self.rank}")
        if not 0 <= self.dropout < 1:
            raise InputError(f"--lora-dropout must be in [0, 1), got {self.dropout}")
        unknown = sorted(set(self.targets) - set(TARGETS))
        if unknown or not self.targets:
            raise InputError(f"--lora-targets {','.join(self.targets)}: choose from {', '.join(TARGETS)} (the DiT's "
                             f"layer names)")

    @property
    def scale(self) -> float:
        return (self.alpha if self.alpha is not None else self.rank) / self.rank


def _peft():
    try:
        import peft
    except ImportError as e:
        raise ImportError("LoRA needs peft: pip install peft (it is in the dev extras)") from e
    return peft


def add_lora(dit: nn.Module, settings: LoraSettings) -> nn.Module:
    """Inject LoRA layers into `dit` in place (peft); only they stay trainable. B starts at zero, so the model
    computes what it did."""
    return _inject(dit, settings.rank, settings.alpha if settings.alpha is not None else settings.rank,
                   settings.dropout, list(settings.targets))


def _inject(dit: nn.Module, rank: int, alpha: float, dropout: float, targets: list[str]) -> nn.Module:
    """peft's LoRA on the layers named (or ending in) `targets`."""
    peft = _peft()
    config = peft.LoraConfig(r=rank, lora_alpha=alpha, lora_dropout=dropout, target_modules=targets, bias="none")
    return peft.inject_adapter_in_model(config, dit)


def has_lora(module: nn.Module) -> bool:
    return any(".lora_A." in name for name, _ in module.named_parameters())


def _layers(dit: nn.Module):
    """(our layer name, its peft LoRA layer) for every adapted layer of `dit`."""
    from peft.tuners.lora import LoraLayer

    for name, module in dit.named_modules():
        if isinstance(module, LoraLayer):
            yield name, module


def adapter_state(dit: nn.Module) -> dict[str, torch.Tensor]:
    """The adapters of a DiT3D as its layers' updates: {layer + ".lora_A": A (r, in), layer + ".lora_B":
    scale * B (out, r)}."""
    scales = {layer.scaling[adapter] for _, layer in _layers(dit) for adapter in layer.scaling}
    if len(scales) > 1:
        raise ValueError(f"the adapters have several scales {sorted(scales)}; one LoRA per model is supported")
    return updates(dit.state_dict(), scales.pop() if scales else 1.0)


def updates(state: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    """The same from a state dict of a DiT3D with peft adapters (keys "<layer>.lora_A.<adapter>.weight"), such as
    the full state dict the trainer gathers from a sharded model."""
    out = {}
    for key, value in state.items():
        for which in ("lora_A", "lora_B"):
            if f".{which}." in key and key.endswith(".weight"):
                layer = key[: key.index(f".{which}.")]
                out[f"{layer}.{which}"] = value.detach() * (scale if which == "lora_B" else 1.0)
    return out


def to_diffusers(state: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """Our adapter state (see adapter_state) in diffusers' WanTransformer3DModel LoRA names, prefixed
    "transformer." as WanPipeline.load_lora_weights expects."""
    out = {}
    for key, a in state.items():
        if not key.endswith(".lora_A"):
            continue
        layer = key[: -len(".lora_A")]
        block, _, local = layer.partition(".")[2].partition(".")  # "blocks.3.attn.qkv" -> "3", "attn.qkv"
        if local not in _DIFFUSERS or not layer.startswith("blocks."):
            raise InputError(f"the LoRA layer {layer} has no counterpart in diffusers' Wan transformer")
        theirs, parts = _DIFFUSERS[local]
        b = state[layer + ".lora_B"]
        pieces = zip(parts, b.split(width)) if parts else [(None, b)]
        for part, b_part in pieces:
            name = f"transformer.blocks.{block}." + (theirs.format(part) if part else theirs)
            out[name + ".lora_A.weight"] = a.clone()  # its own copy per part: safetensors stores no shared memory
            out[name + ".lora_B.weight"] = b_part.contiguous()
    return out


def from_diffusers(state: dict[str, torch.Tensor], width: int) -> dict[str, torch.Tensor]:
    """The inverse of to_diffusers, for files it wrote (the row blocks of a fused layer share A)."""
    reverse = {}
    for local, (theirs, parts) in _DIFFUSERS.items():
        for part in parts or [None]:
            reverse[theirs.format(part) if part else theirs] = (local, part)
    grouped: dict[str, dict] = {}
    for key, value in state.items():
        name = key.removeprefix("transformer.")
        if not name.startswith("blocks.") or not name.endswith((".lora_A.weight", ".lora_B.weight")):
            raise InputError(f"{key} is not a LoRA weight of a Wan transformer block")
        _, block, rest = name.split(".", 2)
        layer_name, which = rest[: -len(".lora_A.weight")], rest[-len("lora_A.weight"):-len(".weight")]
        if layer_name not in reverse:
            raise InputError(f"{key}: no layer of DiT3D computes diffusers' {layer_name}")
        local, part = reverse[layer_name]
        entry = grouped.setdefault(f"blocks.{block}.{local}", {})
        entry[(which, part)] = value
    out = {}
    for layer, entry in grouped.items():
        parts = _DIFFUSERS[layer.split(".", 2)[2]][1]
        keys = list(parts) if parts else [None]
        try:
            out[layer + ".lora_A"] = entry[("lora_A", keys[0])]
            out[layer + ".lora_B"] = torch.cat([entry[("lora_B", k)] for k in keys])
        except KeyError as e:
            raise InputError(f"the LoRA file lacks {layer}'s {e.args[0][0]} for {e.args[0][1]}: every part of a fused "
                             f"layer ({', '.join(map(str, keys))}) must be adapted together") from None
        if any(not torch.equal(entry[("lora_A", k)], out[layer + ".lora_A"]) for k in keys[1:]):
            raise InputError(f"the LoRA file's {layer} parts have different A matrices: DiT3D's fused layer cannot "
                             f"hold them (only adapters written by DiT3D load back)")
    return out


def save_adapter(updates_: dict[str, torch.Tensor], width: int, directory: str | Path,
                 settings: LoraSettings | None = None) -> Path:
    """directory/pytorch_lora_weights.safetensors from our adapter updates (see `adapter_state`, `updates`), in
    diffusers' names (load_lora_weights reads it), written atomically, with the training settings in its
    metadata."""
    path = Path(directory) / ADAPTER_FILE
    tensors = {k: v.cpu() for k, v in to_diffusers(updates_, width).items()}
    metadata = {"format": "pt", "dit3d_lora": json.dumps(asdict(settings) if settings else {})}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)
    return path


def read_adapter(path: str | Path, width: int) -> dict[str, torch.Tensor]:
    """Our adapter state from a file save_adapter wrote (or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / ADAPTER_FILE
    if not path.is_file():
        raise MissingInputError(f"no LoRA adapter at {path}")
    try:
        return from_diffusers(load_file(str(path)), width)
    except SafetensorError as e:
        raise InputError(f"{path} cannot be read ({e}): the file is damaged or truncated") from None


def load_adapter(dit: nn.Module, path: str | Path) -> nn.Module:
    """Add the adapter at `path` to a DiT3D without one (rank from the file, scale 1: save_adapter folded it)."""
    state = read_adapter(path, dit.config.width)
    layers = dict(dit.named_modules())
    problems = [f"{k[: -len('.lora_A')]} (no such layer)" for k in state if k.endswith(".lora_A")
                and k[: -len(".lora_A")] not in layers]
    for key, value in state.items():
        layer = layers.get(key.rsplit(".", 1)[0])
        if layer is None or not isinstance(layer, nn.Linear):
            continue
        want = layer.in_features if key.endswith("lora_A") else layer.out_features
        got = value.shape[1] if key.endswith("lora_A") else value.shape[0]
        if want != got:
            problems.append(f"{key} is {tuple(value.shape)} for a layer of {layer.in_features} -> {layer.out_features}")
    if problems:
        raise InputError(f"the LoRA at {path} was made for another model: {', '.join(problems[:4])}"
                         + (" ..." if len(problems) > 4 else ""))
    ranks = {v.shape[0] for k, v in state.items() if k.endswith("lora_A")}
    if len(ranks) != 1:
        raise InputError(f"the LoRA at {path} mixes ranks {sorted(ranks)}")
    rank = ranks.pop()
    _inject(dit, rank, rank, 0.0, sorted(k[: -len(".lora_A")] for k in state if k.endswith(".lora_A")))
    for name, layer in _layers(dit):
        (adapter,) = layer.lora_A.keys()
        with torch.no_grad():
            layer.lora_A[adapter].weight.copy_(state[f"{name}.lora_A"])
            layer.lora_B[adapter].weight.copy_(state[f"{name}.lora_B"])
    return dit


def merged_state(state: dict[str, torch.Tensor], updates_: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The state dict of the plain DiT3D that computes what the one with adapters computes: W + scale B A, from
    the adapted model's state dict (peft's names) and its updates."""
    out = {}
    for key, value in state.items():
        if ".lora_" in key:
            continue
        plain = key.replace(".base_layer.", ".")
        layer = plain.rsplit(".", 1)[0]
        if plain.endswith(".weight") and layer + ".lora_A" in updates_:
            delta = updates_[layer + ".lora_B"].float() @ updates_[layer + ".lora_A"].float()  # (out, in)
            value = value + delta.to(device=value.device, dtype=value.dtype)
        out[plain] = value.detach()
    return out


def merged(dit: nn.Module) -> nn.Module:
    """A new plain DiT3D with the adapters folded into its weights; the one given is left as it is, and the new
    one shares its tensors where no adapter changes them (no second copy of a 14B model)."""
    state = merged_state(dit.state_dict(), adapter_state(dit))
    with torch.device("meta"):
        model = type(dit)(dit.config)
    model.load_state_dict(state, assign=True)
    return model

"""Export a Wan-compatible DiT (a train.py run that fine-tuned Wan2.1, its model/ or dit/ folder) as a diffusers
WanTransformer3DModel folder, which diffusers (and ComfyUI, and the tools built on them) load.

    python -m dit3d.to_diffusers RUN OUT [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from checkpoint_io import CONFIG_NAME, dit_folder
from errors import InputError

from .checkpoint import load_dit, save_diffusers


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m dit3d.to_diffusers", description=__doc__.split("\n\n")[0])
    p.add_argument("src", type=Path, help="a train.py DiT run folder, its model/ or its model/dit/")
    p.add_argument("out", type=Path, help="the WanTransformer3DModel folder to write (e.g. OUT/transformer)")
    p.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32",
                   help="the dtype the weights are written in")
    args = p.parse_args(argv)
    try:
        src = dit_folder(args.src)
        lora = [f for f in (args.src / "model" / "lora", args.src / "lora") if f.is_dir()]
        if not (src / CONFIG_NAME).is_file() and lora:
            raise InputError(f"{args.src} holds a LoRA adapter, not a whole DiT: diffusers loads the adapter itself "
                             f"(load_lora_weights on its lora/ folder), or train with --lora-merge to export merged weights")
        save_diffusers(load_dit(src), args.out, getattr(torch, args.dtype))
    except InputError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"wrote {args.out} (WanTransformer3DModel.from_pretrained loads it)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

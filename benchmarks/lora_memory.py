"""An estimate, not a measurement, of the accelerator memory of LoRA training (``train.lora``)
of DeepFloyd IF-I-XL at 64 px: built on the meta device (no weights, no memory), it counts

- the frozen base's parameters in bf16 (``lora.base_dtype: bf16``),
- the adapter's float32 parameters, its EMA twin, its gradients and AdamW's two moments,
- the activations autograd keeps for the backward pass of one training forward (the noisy
  images and T5-XXL's 77 x 4096 text tokens in, bf16, the loss through the adapter), summed
  over every tensor ``torch.autograd.graph.saved_tensors_hooks`` packs, per batch size,
  with and without activation checkpointing of the down/up blocks (diffusers'
  ``enable_gradient_checkpointing``).

The T5-XXL encoder is not on the accelerator (``imagen embed`` precomputes the embeddings),
and the allocator's fragmentation and the CUDA context (about 0.5-1 GB) are not counted.

    python benchmarks/lora_memory.py [--rank 4] [--batch 1 2 4 8]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from common import write  # noqa: E402
from if_scale import IF_I_XL  # noqa: E402

from imagen.models.lora import add_adapter, set_active  # noqa: E402
from imagen.models.lora_spec import LoraSettings  # noqa: E402
from imagen.models.networks import NETWORKS  # noqa: E402
from imagen.training.lora import peft_config  # noqa: E402

GB = 1e9


def build(rank: int) -> tuple[torch.nn.Module, LoraSettings]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**IF_I_XL).to(torch.bfloat16)
    unet.requires_grad_(False)
    settings = LoraSettings(rank=rank, targets=list(NETWORKS["diffusers-unet"].lora_targets))
    add_adapter(unet, "default", peft_config(settings))
    set_active(unet, ["default"])
    return unet, settings


def saved_bytes(unet: torch.nn.Module, batch: int, checkpointing: bool) -> int:
    """Bytes of the tensors autograd saves for the backward pass of one training forward
    (each tensor object once; views of one storage are counted apart, so this errs high)."""
    seen: dict[int, int] = {}
    weights = {id(p) for p in unet.parameters()}  # saved weights are the parameters themselves

    def pack(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in weights and not isinstance(t, torch.nn.Parameter):
            seen[id(t)] = t.numel() * t.element_size()
        return t

    if checkpointing:
        unet.enable_gradient_checkpointing()
    else:
        unet.disable_gradient_checkpointing()
    unet.train()
    x = torch.randn(batch, 3, 64, 64, device="meta", dtype=torch.bfloat16)
    t = torch.full((batch,), 500, device="meta")
    text = torch.randn(batch, 77, 4096, device="meta", dtype=torch.bfloat16)
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = unet(x, t, encoder_hidden_states=text).sample
        out.float().pow(2).mean()
    return sum(seen.values())


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--batch", type=int, nargs="+", default=[1, 2, 4, 8])
    args = p.parse_args()
    unet, settings = build(args.rank)
    base = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" not in n)
    lora = sum(p.numel() for n, p in unet.named_parameters() if ".lora_" in n)
    fixed = base * 2 + lora * 4 * 5  # bf16 base; adapter, EMA, gradient, two AdamW moments
    rows = []
    for b in args.batch:
        for ckpt in (False, True):
            act = saved_bytes(unet, b, ckpt)
            rows.append(
                {
                    "batch": b,
                    "checkpointing": ckpt,
                    "activations_gb": round(act / GB, 2),
                    "total_gb": round((fixed + act) / GB, 2),
                }
            )
            print(
                f"batch {b:2d} checkpointing {ckpt!s:5}: activations {act / GB:6.2f} GB, "
                f"total {(fixed + act) / GB:6.2f} GB"
            )
    payload = {
        "what": "estimate (meta device): IF-I-XL LoRA training memory at 64 px, bf16 base",
        "base_params": base,
        "lora_params": lora,
        "rank": args.rank,
        "targets": settings.targets,
        "fixed_gb": round(fixed / GB, 2),
        "rows": rows,
        "not_counted": "T5-XXL (embeddings precomputed), CUDA context, allocator fragmentation",
    }
    print(f"base {base / 1e9:.2f}B params ({base * 2 / GB:.1f} GB bf16), LoRA {lora / 1e6:.2f}M")
    print(f"wrote {write('lora_memory', payload)}")


if __name__ == "__main__":
    main()

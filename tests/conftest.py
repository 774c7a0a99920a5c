"""Test settings: offline, one CPU thread, small deterministic models."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(int(os.environ.get("IMAGEN_TEST_THREADS", "1")))


@pytest.fixture
def hash_encoder():
    from imagen.text.encoders import HashTextEncoder

    return HashTextEncoder(dim=32, max_length=12)


def pytest_configure(config):
    import warnings

    warnings.filterwarnings("ignore", message=".*suggested max number of worker.*")
    warnings.filterwarnings("ignore", message=".*will save all extracted features in buffer.*")

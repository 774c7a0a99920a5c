"""The typed config builder: every value checked against its field's annotation, with errors
that name the field; config files with syntax errors are one-line errors naming the line."""

import json
import math

import pytest

from imagen.diffusion.schedules import DiffusionConfig
from imagen.models.stage_config import StageConfig
from imagen.models.unet import UNetConfig
from imagen.training.config import (
    StageRun,
    TrainConfig,
    parse_cascade_config,
    read_config_file,
)
from imagen.utils.config import ConfigError, config_from_dict


def test_values_are_typed_and_converted():
    tc = config_from_dict(TrainConfig, {"lr": 1, "betas": [0.9, 0.95], "ema_halflife_images": None})
    assert tc.lr == 1.0 and isinstance(tc.lr, float) and tc.betas == (0.9, 0.95)
    stage = config_from_dict(
        StageConfig, {"sampling": {"threshold": {"mode": "static"}, "guidance": 2}}
    )
    assert stage.sampling.threshold.mode == "static" and stage.sampling.guidance == 2.0
    unet = UNetConfig.from_dict({"channel_mults": [1, 2], "num_res_blocks": [1, 1]})
    assert unet.channel_mults == (1, 2)


@pytest.mark.parametrize(
    ("cls", "data", "message"),
    [
        (TrainConfig, {"lr": "fast"}, "TrainConfig.lr: expected a number, got 'fast'"),
        (TrainConfig, {"batch_size": 1.5}, "TrainConfig.batch_size: expected an integer, got 1.5"),
        (TrainConfig, {"batch_size": True}, "TrainConfig.batch_size: expected an integer"),
        (TrainConfig, {"lr": [1, 2]}, "TrainConfig.lr: expected a number, got [1, 2]"),
        (TrainConfig, {"lr": math.nan}, "TrainConfig.lr: expected a finite number, got nan"),
        (TrainConfig, {"lr": math.inf}, "expected a finite number, got inf"),
        (TrainConfig, {"lr": "1e-4"}, "write 1.0e-4"),
        (TrainConfig, {"betas": [0.9]}, "TrainConfig.betas: expected a list of 2 values"),
        (TrainConfig, {"betas": 0.9}, "TrainConfig.betas: expected a list"),
        (TrainConfig, {"compile": "yes"}, "TrainConfig.compile: expected true or false"),
        (TrainConfig, {"channels_last": 3}, "channels_last: expected true or false or null"),
        (TrainConfig, {"optimizer": 3}, "TrainConfig.optimizer: expected text, got 3"),
        (TrainConfig, {"batch": 2}, "unknown TrainConfig field(s): batch"),
        (TrainConfig, "fast", "TrainConfig: expected a mapping of fields"),
        (DiffusionConfig, {"schedule": "square"}, "DiffusionConfig.schedule: expected one of"),
        (
            StageConfig,
            {"sampling": {"guidance": math.nan}},
            "StageConfig.sampling.guidance: expected a finite number",
        ),
        (
            StageConfig,
            {"sampling": {"gudance": 3}},
            "StageConfig.sampling: unknown SamplingConfig field(s): gudance",
        ),
        (StageConfig, {"sampling": {"steps": 0}}, "StageConfig.sampling: steps must be"),
        (StageConfig, {"sampling": "fast"}, "StageConfig.sampling: expected a mapping"),
        (StageConfig, {"unet": {"channel_mults": [1, "x"]}}, "unet.channel_mults[1]: expected"),
        (StageRun, {"train": {}}, "missing StageRun field(s): stage"),
    ],
)
def test_bad_values_name_their_field(cls, data, message):
    with pytest.raises(ConfigError) as info:
        config_from_dict(cls, data)
    assert message in str(info.value) and "\n" not in str(info.value)


def test_cascade_config_errors_name_the_stage():
    with pytest.raises(ValueError, match=r"stage 0: .*lr: expected a number, got 'fast'"):
        parse_cascade_config({"stages": [{"preset": "tiny-base", "train": {"lr": "fast"}}]})
    with pytest.raises(ValueError, match=r"stage 0: .*compile_mode must be one of default, "):
        parse_cascade_config({"stages": [{"preset": "tiny-base", "train": {"compile_mode": "x"}}]})
    with pytest.raises(ValueError, match=r"stage 0: .*guidance: expected a finite number"):
        parse_cascade_config(
            {"stages": [{"preset": "tiny-base", "stage": {"sampling": {"guidance": math.inf}}}]}
        )


@pytest.mark.parametrize(
    ("name", "text", "message"),
    [
        ("c.yaml", "stages:\n  - preset: x\n   bad: [\n", "c.yaml: line 3: invalid YAML"),
        ("c.yaml", "a: [1, 2\n", "c.yaml: line 2: invalid YAML"),
        ("c.toml", "[stages\n", "c.toml: invalid TOML: "),
        ("c.json", '{\n"a": 1,,\n}', "c.json: line 2: invalid JSON"),
        ("c.json", "[1, 2]", "must hold a mapping"),
        ("c.ini", "a=1", "config must be .yaml"),
    ],
)
def test_config_file_syntax_errors_are_one_line(tmp_path, name, text, message):
    (tmp_path / name).write_text(text)
    with pytest.raises(ValueError) as info:
        read_config_file(tmp_path / name)
    assert message in str(info.value) and "\n" not in str(info.value)
    (tmp_path / "bin.yaml").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ValueError, match="not UTF-8"):
        read_config_file(tmp_path / "bin.yaml")


def test_resolved_configs_round_trip_through_json(tmp_path):
    cfg = parse_cascade_config({"stages": [{"preset": "tiny-base"}, {"preset": "tiny-sr"}]})
    again = parse_cascade_config(json.loads(json.dumps(cfg.to_dict())))
    assert again == cfg

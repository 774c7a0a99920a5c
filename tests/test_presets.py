import pytest

from imagen.models.presets import PRESETS, count_preset_parameters, get_preset


@pytest.mark.parametrize(
    ("name", "target"), [("paper-base64", 2.0e9), ("paper-sr256", 600e6), ("paper-sr1024", 400e6)]
)
def test_paper_presets_match_the_paper_sizes(name, target):
    n = count_preset_parameters(get_preset(name))  # built on the meta device: no memory
    assert abs(n - target) / target < 0.15, f"{name}: {n / 1e6:.0f}M parameters"


def test_paper_cascade_is_64_256_1024():
    sizes = [get_preset(n).resolution for n in ("paper-base64", "paper-sr256", "paper-sr1024")]
    assert sizes == [64, 256, 1024]
    assert (
        get_preset("paper-sr256").lowres_size == 64
        and get_preset("paper-sr1024").lowres_size == 256
    )
    last = get_preset("paper-sr1024")
    assert (
        last.unet.attn_resolutions == () and last.unet.cross_attn_resolutions
    )  # paper: no self-attn
    assert last.diffusion.schedule == "linear"


def test_every_preset_builds_and_unknown_is_an_error():
    for name in PRESETS:
        assert count_preset_parameters(get_preset(name)) > 0
    with pytest.raises(ValueError, match="unknown preset"):
        get_preset("dalle")

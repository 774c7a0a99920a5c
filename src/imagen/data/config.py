"""Where training images and captions come from, and how they are decoded."""

from __future__ import annotations

from dataclasses import dataclass, field, fields

from imagen.data.images import DEFAULT_MAX_PIXELS, Preprocess
from imagen.data.shapes import ShapesConfig
from imagen.data.sources import get_source


@dataclass
class DataConfig:
    """Where training images and captions come from."""

    kind: str = "shapes"  # a registered source: shapes | folder | webdataset (see data.sources)
    path: str | list[str] | None = None  # folder, or shard pattern(s) / URLs for webdataset
    shapes: ShapesConfig = field(default_factory=ShapesConfig)
    num_workers: int | None = None  # DataLoader worker processes; None: automatic (none when
    # training on CPUs, whose cores train; on a GPU, the host's cores per GPU less two, up to 16)
    min_size: int = 0  # skip images whose shorter side is smaller (0: keep all, upsampling)
    shuffle_buffer: int = 1000  # webdataset only
    random_crop: bool = True  # random crops in training (centre crops otherwise)
    resize_to: int = 0  # resize the shorter side to this, then crop the stage's size (0: size)
    hflip: bool = False  # random horizontal flips: off, as they break "left"/"right" captions
    seed: int = 0  # seed of random crops
    max_pixels: int = DEFAULT_MAX_PIXELS  # skip images whose header claims more (bombs);
    # Pillow's own limit (2 x PIL.Image.MAX_IMAGE_PIXELS, about 179 MP) applies above this
    allow_pipe: bool = False  # webdataset: allow ``pipe:CMD`` shards, which run CMD in a shell
    # (e.g. ``pipe:curl -s URL``); off, so a config file cannot run a command unasked

    def __post_init__(self) -> None:
        if isinstance(self.shapes, dict):
            unknown = sorted(set(self.shapes) - {f.name for f in fields(ShapesConfig)})
            if unknown:
                raise ValueError(f"unknown ShapesConfig field(s): {', '.join(unknown)}")
            self.shapes = ShapesConfig(**self.shapes)
        if get_source(self.kind).needs_path and not self.path:
            raise ValueError(f"data.kind {self.kind!r} needs data.path")
        for name in ("num_workers", "min_size", "shuffle_buffer", "resize_to", "seed"):
            if name == "num_workers" and self.num_workers is None:
                continue
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 0:
                raise ValueError(
                    f"data.{name} must be an integer >= 0, got {getattr(self, name)!r}"
                )
        if not isinstance(self.max_pixels, int) or self.max_pixels < 1:
            raise ValueError(f"data.max_pixels must be an integer >= 1, got {self.max_pixels!r}")
        if self.kind == "webdataset" and self.path:
            from imagen.data.webdataset import check_pipe_shards

            check_pipe_shards(self.path, self.allow_pipe)

    def preprocess(self, size: int, training: bool = True) -> Preprocess:
        """How this data's images become inputs of a stage of resolution ``size`` (random crops
        and flips in training only)."""
        return Preprocess(
            size,
            self.resize_to,
            self.min_size,
            training and self.random_crop,
            training and self.hflip,
            self.seed,
            self.max_pixels,
        )

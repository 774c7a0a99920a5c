"""Checks of an untrusted model directory, before any of it is used.

A model directory may come from anywhere (a download, a colleague, a disk that rots), so every
part is checked before it does work: the index's schema and format version, stage paths that
stay inside the directory, each stage configuration's numbers, the sha256 of every file the
index records, and each weights file's tensor names, shapes and dtypes against the network
built from the configuration, read from the safetensors header before any tensor is loaded
(so an edited shape is a clear error, not a crash inside int8 dequantisation). Each failure is
a ``ValueError`` of one line naming the file.
"""

from __future__ import annotations

import hashlib
import math
import os
import re
from pathlib import Path
from typing import Any

import torch

from imagen.models.limits import MAX_IMAGE_SIZE, MAX_TIMESTEPS, check_range
from imagen.models.stage_config import StageConfig

FORMAT = "imagen-cascade"
VERSIONS = (1,)  # the format versions this code reads
SHA256 = re.compile(r"[0-9a-f]{64}")
SCALE_SUFFIX = ".int8_scale"  # as imagen.utils.tensors writes int8 weights
FLOAT_FILE_DTYPES = ("F16", "BF16", "F32")  # how a float parameter may be stored (or I8)
FILE_DTYPE = {
    torch.float64: "F64",
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
Shapes = dict[str, tuple[tuple[int, ...], str]]  # tensor name -> (shape, safetensors dtype)


# ---- the index -----------------------------------------------------------------------------
def check_index(index: Any, path: Path) -> None:
    """Raise unless ``index`` (the parsed ``model_index.json`` at ``path``) follows the format:
    a known format version, stages that are directory names inside the model, a text encoder
    record, and checksums (if any) that map file names to sha256 digests."""
    if not isinstance(index, dict) or index.get("format") != FORMAT:
        raise ValueError(f"{path} is not an {FORMAT} index")
    version = index.get("version")
    if isinstance(version, bool) or version not in VERSIONS:
        raise ValueError(
            f"{path}: format version {version!r} is not one this imagen reads "
            f"({', '.join(map(str, VERSIONS))}); a newer imagen may read it"
        )
    stages = index.get("stages")
    if not isinstance(stages, list) or not stages or not all(isinstance(s, str) for s in stages):
        raise ValueError(f"{path}: stages must be a list of stage directory names")
    if len(set(stages)) != len(stages):
        raise ValueError(f"{path}: stages lists a directory twice: {stages}")
    for name in stages:
        stage_path(path.parent, name)
    te = index.get("text_encoder")
    if not isinstance(te, dict) or not isinstance(te.get("name"), str):
        raise ValueError(f"{path}: text_encoder must be a record with a name")
    for key in ("max_length", "dim"):
        value = te.get(key, 1)  # dim: recorded by imports and newer exports
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(
                f"{path}: text_encoder.{key} must be a positive integer, got {value!r}"
            )
    check_checksums(index.get("checksums"), path)


def check_checksums(checksums: Any, path: Path) -> None:
    """Raise unless ``checksums`` is absent (models written before checksums) or a mapping of
    relative file names to lowercase hex sha256 digests."""
    if checksums is None:
        return
    if not isinstance(checksums, dict):
        raise ValueError(f"{path}: checksums must map file names to sha256 digests")
    for name, digest in checksums.items():
        if not isinstance(digest, str) or not SHA256.fullmatch(digest):
            raise ValueError(f"{path}: checksums[{name!r}] is not a sha256 digest: {digest!r}")


def stage_path(root: Path, name: str) -> Path:
    """The directory of stage ``name`` of the model at ``root``; a ValueError if the name is
    absolute, climbs out with ``..``, or resolves (through a symlink) outside the model."""
    index = root / "model_index.json"
    if not name or os.path.isabs(name) or name.startswith("~") or ".." in Path(name).parts:
        raise ValueError(f"{index}: stage {name!r} is not a directory inside the model")
    here = (root / name).resolve()
    if not here.is_relative_to(root.resolve()):
        raise ValueError(f"{index}: stage {name!r} leads outside the model (to {here})")
    return root / name


def recorded_sha256(checksums: dict[str, Any] | None, key: str, index: Path) -> str | None:
    """The sha256 the index records for ``key`` (``stageK/file``); None for a model written
    before checksums; a ValueError if the index has checksums but none for ``key``."""
    if checksums is None:
        return None
    if key not in checksums:
        raise ValueError(f"{index} records no sha256 for {key} (damaged or edited index)")
    return checksums[key]


def file_sha256(path: str | Path) -> str:
    """The sha256 of a file, read in 1 MiB blocks."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 20):
            h.update(block)
    return h.hexdigest()


def verify_file(path: Path, want: str | None, index: Path) -> None:
    """Raise unless the file at ``path`` has the sha256 ``want`` (None: not recorded)."""
    if want is not None and checked_sha256(path) != want:
        what = "damaged weights" if path.suffix == ".safetensors" else "damaged"
        raise ValueError(f"{path} does not match its sha256 in {index.name} ({what})")


# ---- a stage's configuration ---------------------------------------------------------------
def check_stage_config(cfg: StageConfig, source: str) -> None:
    """Raise unless the sizes and numbers of ``cfg`` (read from ``source``) are ones a network
    can be built from: positive, within the bounds above (so building the U-Net cannot be
    asked for absurd memory), diffusion constants in their ranges."""
    cfg.unet.check_sizes(source)  # each network kind checks its own sizes
    if cfg.lowres_size is not None:
        check_range(source, "lowres_size", cfg.lowres_size, 1, MAX_IMAGE_SIZE)
    _check_diffusion(cfg, source)


def _check_diffusion(cfg: StageConfig, source: str) -> None:
    d = cfg.diffusion
    check_range(source, "diffusion.timesteps", d.timesteps, 2, MAX_TIMESTEPS)
    if not d.min_snr_gamma > 0:
        raise ValueError(f"{source}: diffusion.min_snr_gamma must be > 0, got {d.min_snr_gamma}")
    if not 0.0 < d.linear_beta_start <= d.linear_beta_end < 1.0:
        raise ValueError(
            f"{source}: diffusion needs 0 < linear_beta_start <= linear_beta_end < 1, got "
            f"{d.linear_beta_start} and {d.linear_beta_end}"
        )
    if not (math.isfinite(d.cosine_s) and d.cosine_s >= 0):
        raise ValueError(f"{source}: diffusion.cosine_s must be >= 0, got {d.cosine_s}")


# ---- a weights file against its network ----------------------------------------------------
def expected_tensors(state: dict[str, torch.Tensor]) -> Shapes:
    """Names, shapes and dtypes of a freshly built module's state dict."""
    return {k: (tuple(v.shape), FILE_DTYPE.get(v.dtype, str(v.dtype))) for k, v in state.items()}


MAX_HEADER_BYTES = 16 << 20  # a safetensors header (IF-I-XL's is about 150 kB)


def read_header(path: Path) -> Shapes:
    """Names, shapes and dtypes of the tensors of a safetensors file, from its header alone
    (no tensor data is read): a header over :data:`MAX_HEADER_BYTES`, or a file that is not
    safetensors or is cut short, is a one-line ValueError naming the file."""
    from safetensors import SafetensorError, safe_open

    size = Path(path).stat().st_size
    with open(path, "rb") as f:
        head = f.read(8)
    claimed = int.from_bytes(head, "little") if len(head) == 8 else -1
    if claimed < 0 or claimed > MAX_HEADER_BYTES or 8 + claimed > size:
        what = "header too large" if claimed > MAX_HEADER_BYTES else "header cut short"
        raise ValueError(f"{path} is not a readable safetensors file ({what}; {size} bytes)")
    out: Shapes = {}
    try:
        with safe_open(str(path), "pt") as f:
            for key in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                sl = f.get_slice(key)
                out[key] = (tuple(sl.get_shape()), sl.get_dtype())
    except SafetensorError as e:
        raise ValueError(f"{path} is not a readable safetensors file ({e})") from None
    return out


def tensor_mismatch(expected: Shapes, header: Shapes) -> str | None:
    """The first difference between what the network needs and what the file holds, in the
    network's order, as a phrase naming the tensor; None if the file fits. A float tensor may
    be stored as F16, BF16 or F32, or as I8 with a per-channel ``.int8_scale`` beside it."""
    for name, (shape, dtype) in expected.items():
        if name not in header:
            return f"tensor {name} is missing"
        got_shape, got = header[name]
        if got_shape != shape:
            return f"tensor {name} has shape {list(got_shape)}, the network needs {list(shape)}"
        if dtype in FLOAT_FILE_DTYPES + ("F64",):
            if got == "I8":
                problem = _int8_problem(name, shape, header)
                if problem:
                    return problem
            elif got not in FLOAT_FILE_DTYPES:
                return f"tensor {name} is stored as {got}, not a float type (F16, BF16, F32)"
        elif got != dtype:
            return f"tensor {name} is stored as {got}, the network needs {dtype}"
    scales = {n + SCALE_SUFFIX for n in expected if header.get(n, ((), ""))[1] == "I8"}
    for name in header:
        if name not in expected and name not in scales:
            return f"tensor {name} is not part of the network"
    return None


def _int8_problem(name: str, shape: tuple[int, ...], header: Shapes) -> str | None:
    scale = header.get(name + SCALE_SUFFIX)
    if len(shape) < 2:
        return f"tensor {name} is stored as I8, which only weights of 2 or more dimensions may be"
    if scale is None:
        return f"tensor {name} is stored as I8 without its {name}{SCALE_SUFFIX}"
    if scale[0] != (shape[0],) or scale[1] not in FLOAT_FILE_DTYPES:
        return f"tensor {name}{SCALE_SUFFIX} must be {shape[0]} float scales, got {scale}"
    return None


def check_weights_file(expected: Shapes, path: Path, config: str = "config.json") -> None:
    """Raise (one line, naming the file and the first tensor that differs) unless the weights
    at ``path`` fit the network whose state dict is described by ``expected``."""
    problem = tensor_mismatch(expected, read_header(path))
    if problem:
        raise ValueError(f"{path} does not fit the network of its {config}: {problem}")


def check_weights(module: torch.nn.Module, path: Path) -> None:
    """:func:`check_weights_file` against a freshly built ``module`` (on the meta device too:
    only names, shapes and dtypes are compared); a missing file is left to the loader."""
    if Path(path).is_file():
        check_weights_file(expected_tensors(module.state_dict()), Path(path))


# ---- replacing a model directory -----------------------------------------------------------
def foreign_files(root: Path, stage_files: tuple[str, ...]) -> list[str]:
    """Files and directories in the model directory ``root`` that are not the model's own
    (its index, and ``stage_files`` in each stage its index lists), relative to ``root``:
    what replacing the model would delete. With an unreadable index, everything but the index
    counts as foreign."""
    import json

    index_path = root / "model_index.json"
    try:
        stages = json.loads(index_path.read_text()).get("stages")
    except (OSError, ValueError, AttributeError, RecursionError):
        stages = None
    stages = {s for s in stages if isinstance(s, str)} if isinstance(stages, list) else set()
    out = []
    for p in sorted(root.iterdir()):
        if p.name == index_path.name:
            continue
        if p.name in stages and p.is_dir() and not p.is_symlink():
            out += [f"{p.name}/{q.name}" for q in sorted(p.iterdir()) if q.name not in stage_files]
        else:
            out.append(p.name)
    return out


# ---- hashing once --------------------------------------------------------------------------
STAMP_BYTES = 256 << 20  # files this large are hashed in full once, then known by a stamp
_HASHED: dict[tuple[str, int, int, int, str], str] = {}  # (path, size, mtime, inode, sample)


def _stamp_file() -> Path:
    root = os.environ.get("IMAGEN_CACHE_DIR") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "imagen"
    )
    return Path(root) / "verified-sha256.json"


def _read_stamps() -> dict[str, str]:
    import json

    try:
        stamps = json.loads(_stamp_file().read_text())
    except (OSError, ValueError):
        return {}
    return stamps if isinstance(stamps, dict) else {}


def _write_stamp(key: str, digest: str) -> None:
    import json

    path = _stamp_file()
    try:
        stamps = {**_read_stamps(), key: digest}
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps(stamps, indent=1))
        os.replace(tmp, path)
    except OSError:
        pass  # no stamp: the file is hashed again next time


SAMPLE_BLOCK = 1 << 20  # the stamp's sample: the first and last MiB ...
SAMPLE_SPREAD = (16, 64 << 10)  # ... and 16 blocks of 64 KiB spread evenly between them


def sample_sha256(path: Path, size: int) -> str:
    """A sha256 of a sample of a large file: its first and last MiB (the safetensors header
    and the last tensors) and 16 blocks of 64 KiB spread evenly in between: about 3 MiB read,
    so a stamp also catches an edit there that kept the size and the mtime."""
    h = hashlib.sha256()
    count, block = SAMPLE_SPREAD
    middle = size - 2 * SAMPLE_BLOCK
    reads = [(0, size)]  # a file this small is its own sample
    if middle > count * block:
        reads = [(0, SAMPLE_BLOCK), (size - SAMPLE_BLOCK, SAMPLE_BLOCK)]
        reads += [(SAMPLE_BLOCK + middle * i // count, block) for i in range(count)]
    with open(path, "rb") as f:
        for start, length in reads:
            f.seek(start)
            h.update(f.read(length))
    return h.hexdigest()


def checked_sha256(path: Path, full: bool = False) -> str:
    """The sha256 of ``path``. A file under :data:`STAMP_BYTES` is hashed in full each time;
    a larger one (multi-GB imported weights) in full once (or whenever ``full``, as ``imagen
    verify`` asks), after which its stamp (path, size, mtime, inode and the hash of a sample
    of its bytes (:func:`sample_sha256`), with the digest, in ``$IMAGEN_CACHE_DIR`` or
    ``~/.cache/imagen``) stands in while they are unchanged: an edit that changes the size or
    the mtime shows, and so does one in the sampled 3 MiB; other bit rot of a large file after
    its first check shows only to ``imagen verify``."""
    st = path.stat()
    if st.st_size < STAMP_BYTES:  # small files are read in full every time (bit rot shows)
        return file_sha256(path)
    sample = sample_sha256(path, st.st_size)
    key = (str(path.resolve()), st.st_size, st.st_mtime_ns, st.st_ino, sample)
    if full:
        _HASHED.pop(key, None)
        digest = file_sha256(path)
        _write_stamp("|".join(map(str, key)), digest)
        _HASHED[key] = digest
        return digest
    if key in _HASHED:
        return _HASHED[key]
    stamp = "|".join(map(str, key))
    digest = _read_stamps().get(stamp)
    if not isinstance(digest, str) or not SHA256.fullmatch(digest):
        digest = file_sha256(path)
        _write_stamp(stamp, digest)
    _HASHED[key] = digest
    return digest

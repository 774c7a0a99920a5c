"""Where a model comes from: a bundled cascade, a model directory, or a Hugging Face Hub repo
(resolved through huggingface_hub and its cache, so a repo works offline once cached)."""

from __future__ import annotations

import os
import re
from pathlib import Path

from imagen.models.model_dir import read_index

WEIGHTS = Path(__file__).parents[1] / "weights"
BUNDLED_MODEL = WEIGHTS / "shapes-cascade"  # the default model
# the bundled cascades by name: the default, and its base distilled to 4 one-pass steps
BUNDLED = {name: WEIGHTS / name for name in ("shapes-cascade", "shapes-cascade-fast")}
REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def resolve_model(model: str | Path | None) -> Path:
    """The model directory for ``model``: None is the bundled cascade; an existing path is
    used as it is; a bundled cascade's name (``shapes-cascade-fast``) is that cascade; ``ORG/NAME``
    that is not a path is a Hub repo, taken from the Hugging Face cache (downloaded first
    unless offline). Raises FileNotFoundError or ValueError with one line that says which of
    these failed."""
    if model is None:
        return BUNDLED_MODEL
    path = Path(model).expanduser()
    if not path.exists() and str(model) in BUNDLED:
        return BUNDLED[str(model)]
    if path.exists() or not REPO_ID.match(str(model)):
        read_index(path)  # a clear error unless it is a model directory
        return path
    return read_hub_snapshot(str(model))


def read_hub_snapshot(repo_id: str) -> Path:
    """A Hub repo's imagen model directory from the local cache, downloading it first when
    allowed."""
    root = hub_snapshot(repo_id, "model directory")
    read_index(root)
    return root


def hub_snapshot(repo_id: str, what: str = "model directory") -> Path:
    """A Hub repo's files from the local cache (HF_HUB_OFFLINE honoured), downloading them
    first when allowed; ``what`` names what the caller wanted in the one-line errors."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    try:
        root = Path(snapshot_download(repo_id, local_files_only=True))
    except LocalEntryNotFoundError:
        if _offline():
            raise FileNotFoundError(
                f"{repo_id} is not a {what}, nor a Hugging Face Hub repo in the local "
                "cache (HF_HUB_OFFLINE is set, so nothing is downloaded)"
            ) from None
        try:
            root = Path(snapshot_download(repo_id))
        except (HfHubHTTPError, LocalEntryNotFoundError, OSError) as e:
            first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            raise FileNotFoundError(
                f"{repo_id} is not a {what}, and the Hugging Face Hub repo could not be "
                f"fetched: {first}"
            ) from None
    return root


def push_model(
    model_dir: str | Path, repo_id: str, private: bool = False, token: str | None = None
) -> str:
    """Upload a model directory to the Hub repo ``repo_id`` (created if needed); returns the
    repo's URL."""
    from huggingface_hub import HfApi

    root = Path(model_dir)
    read_index(root)
    if not REPO_ID.match(repo_id):
        raise ValueError(f"{repo_id!r} is not a Hub repo id (expected ORG/NAME)")
    api = HfApi(token=token)
    url = api.create_repo(repo_id, private=private, exist_ok=True)
    api.upload_folder(
        repo_id=repo_id, folder_path=str(root), commit_message="Upload imagen model directory"
    )
    return str(url)

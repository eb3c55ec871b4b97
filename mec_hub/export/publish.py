"""Publish a converted folder to the Hugging Face Hub (``create_repo`` + one ``create_commit``).

The model card is pushed as it reads for the repo it goes to: the repo id in place of the
placeholder the folder's card holds (``mec_hub.export.modelcard.for_repo``); the folder itself is
left as it is, and every other file goes byte for byte.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi
from huggingface_hub.errors import HfHubHTTPError

from mec_hub.errors import ChecksumMismatchError, MecHubError, WeightsNotFoundError
from mec_hub.export.modelcard import for_repo
from mec_hub.weights.config import CARD_FILE, CONFIG_FILE, MODEL_FILE, read_config
from mec_hub.weights.integrity import sha256_file
from mec_hub.weights.sources import check_repo_id


@dataclass(frozen=True)
class PushResult:
    files: list[tuple[str, int, str]]  # (name, size in bytes, sha256)
    url: str | None = None
    commit: str | None = None


def check_folder(folder: Path) -> list[tuple[str, int, str]]:
    """Refuse a folder that is incomplete or whose files no longer match the digests in its config."""
    for required in (CONFIG_FILE, MODEL_FILE, CARD_FILE):
        if not (folder / required).is_file():
            raise WeightsNotFoundError(f"{folder}: missing {required}; write the folder with `mec-hub convert`")
    config = read_config(folder)
    files = []
    for path in sorted(p for p in folder.iterdir() if p.is_file() and not p.name.startswith(".")):
        digest = sha256_file(path)
        expected = config.files.get(path.name)
        if expected is not None and expected != digest:
            raise ChecksumMismatchError(str(path), expected, digest)
        files.append((path.name, path.stat().st_size, digest))
    missing = sorted(set(config.files) - {name for name, _, _ in files})
    if missing:
        raise WeightsNotFoundError(f"{folder}: {CONFIG_FILE} lists files that are not there: {', '.join(missing)}")
    return files


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    dry_run: bool = False,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    check_repo_id(repo_id)  # before anything, and in a dry run too: the id the real push would use
    files = check_folder(folder)
    card = for_repo((folder / CARD_FILE).read_text(encoding="utf-8"), repo_id).encode("utf-8")
    files = [(CARD_FILE, len(card), hashlib.sha256(card).hexdigest()) if f[0] == CARD_FILE else f for f in files]
    if dry_run:
        return PushResult(files)

    api = HfApi(endpoint=endpoint, token=token)
    try:
        repo = api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
        if revision is not None:
            # The Hub refuses a commit to a branch that does not exist yet ("Invalid rev id").
            api.create_branch(repo_id, branch=revision, exist_ok=True, repo_type="model")
        operations = [
            CommitOperationAdd(path_in_repo=name, path_or_fileobj=card if name == CARD_FILE else str(folder / name))
            for name, _, _ in files
        ]
        info = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload MEC weights ({read_config(folder).architecture})",
            revision=revision,
            repo_type="model",
        )
    except HfHubHTTPError as exc:
        raise MecHubError(f"push to {repo_id} failed: {exc}") from None
    return PushResult(files, url=str(repo), commit=info.oid)

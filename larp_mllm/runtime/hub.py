"""Checkpoint folders named by a local path or a Hugging Face Hub repo id, and uploads of such folders.

    folder = resolve_folder("hywang66/LARP-L-long-tokenizer", allow_patterns=["config.json", "model.safetensors"])
    push_folder(tokenizer.save_pretrained, "me/my-larp", private=True)  # -> huggingface_hub.CommitInfo

An existing local folder always wins. Any other name must be a Hub repo id ("owner/name"); huggingface_hub's
`snapshot_download` resolves it into the Hub cache (`cache_dir`, default $HF_HUB_CACHE) at `revision` (a branch, tag
or commit hash; default "main") and returns the snapshot folder. Offline (`local_files_only=True`, or HF_HUB_OFFLINE=1)
only the cache is read. `token` defaults to huggingface_hub's own (HF_TOKEN, or the one saved by `hf auth login`).
huggingface_hub is imported inside the functions (it comes with transformers; the core imports without it).
"""
from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable, Sequence

if TYPE_CHECKING:
    from huggingface_hub import CommitInfo

# Configs, safetensors weights and tokenizer files (SentencePiece models, chat templates, BPE merges): never pickles.
SAFE_PATTERNS = ("*.json", "*.safetensors", "*.model", "*.jinja", "*.txt")


def is_hub_id(name: str | os.PathLike) -> bool:
    """True when `name` reads as an "owner/name" Hub repo id and is no existing local path (for recorded names that
    may be either, e.g. a bundle's base model: such a name is worth resolving through the Hub)."""
    from huggingface_hub.errors import HFValidationError
    from huggingface_hub.utils import validate_repo_id

    if Path(name).exists() or str(name).count("/") != 1:
        return False
    try:
        validate_repo_id(str(name))
    except HFValidationError:
        return False
    return True


def resolve_folder(
    name_or_path: str | os.PathLike,
    *,
    revision: str | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
    token: str | bool | None = None,
    allow_patterns: Sequence[str] | None = None,
    what: str = "checkpoint",
) -> Path:
    """A local folder (returned as given; `revision` does not apply to it) or a Hub repo id -> its snapshot folder.

    Only the files matching `allow_patterns` (None: all) are downloaded. `what` names the thing in errors. Raises
    FileNotFoundError saying whether the name is not a valid repo id, is not in the cache (and whether offline mode
    was on), or is not on the Hub; NotADirectoryError when the name is an existing file.
    """
    path = Path(name_or_path)
    if path.is_dir():
        return path
    if path.exists():
        raise NotADirectoryError(f"expected a {what} folder or a Hub repo id, got the file {path}")
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import (HFValidationError, IncompleteSnapshotError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)
    from huggingface_hub.utils import validate_repo_id

    name, rev = str(name_or_path), revision or constants.DEFAULT_REVISION
    try:
        validate_repo_id(name)
    except HFValidationError:
        raise FileNotFoundError(f"{what} folder not found: {name!r} is neither an existing folder nor a valid "
                                "Hugging Face Hub repo id ('owner/name')") from None
    offline = local_files_only or constants.is_offline_mode()
    cache = cache_dir if cache_dir is not None else constants.HF_HUB_CACHE
    try:
        return Path(snapshot_download(name, revision=revision, cache_dir=cache_dir, local_files_only=offline,
                                      token=token, allow_patterns=list(allow_patterns) if allow_patterns else None))
    except IncompleteSnapshotError as e:
        raise FileNotFoundError(f"{what} {name!r} (revision {rev!r}): the cached snapshot in {cache} is incomplete: "
                                f"{e}") from e
    except LocalEntryNotFoundError as e:
        if offline:
            why = "offline mode is on (" + ("local_files_only=True" if local_files_only else "HF_HUB_OFFLINE=1") + ")"
        else:
            why = f"the Hub could not be reached ({e.__cause__ or e})"
        raise FileNotFoundError(f"{what} folder not found: no local folder {name!r}, and the Hub repo {name!r} "
                                f"(revision {rev!r}) is not in the Hub cache {cache}; {why}") from e
    except RevisionNotFoundError as e:
        raise FileNotFoundError(f"{what}: the Hub repo {name!r} has no revision {rev!r}") from e
    except RepositoryNotFoundError as e:  # also gated / private repos without a token
        raise FileNotFoundError(f"{what} folder not found: no local folder {name!r}, and no Hub repo {name!r} that "
                                "this token can read (a private or gated repo needs `token=` or `hf auth login`)"
                                ) from e


def push_folder(
    write: Callable[[Path], Any],
    repo_id: str,
    *,
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
    commit_message: str = "Upload with larp-mllm",
    delete_patterns: Sequence[str] | None = None,
) -> "CommitInfo":
    """Upload what `write(folder)` writes into a fresh temporary folder as one commit to the Hub model repo `repo_id`.

    The repo is created when missing (`private` applies only then), the branch `revision` too (default "main").
    Remote files matching `delete_patterns` (leftovers of an earlier, different upload) are deleted in the same
    commit unless uploaded again. Returns huggingface_hub's CommitInfo (a str: the commit URL).
    """
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id
    if revision is not None and not revision.startswith("refs/pr/"):
        api.create_branch(repo_id, branch=revision, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix="larp-push-") as tmp:
        folder = Path(tmp) / "upload"
        write(folder)
        return api.upload_folder(repo_id=repo_id, folder_path=folder, revision=revision,
                                 commit_message=commit_message,
                                 delete_patterns=list(delete_patterns) if delete_patterns else None)

"""Hub ids: resolution through a Hugging Face cache laid out by the test, offline errors, push_to_hub round trips.

Nothing reaches the network: sockets raise, HF_HUB_OFFLINE is on (the constant huggingface_hub reads at call time),
and the HfApi calls that push_to_hub makes are replaced by fakes that commit into the test's cache as the Hub would
(a new snapshot, the branch's ref moved to it).
"""
from __future__ import annotations

import dataclasses
import hashlib
import secrets
import shutil
import socket
from pathlib import Path

import pytest
import torch
from llm_fixtures import assert_logits_close, larp_tiny, perturb_, tiny_llm, tiny_llm_dir

from larp_mllm import LARPTokenizer
from larp_mllm.runtime.hub import is_hub_id, resolve_folder

REPO = "owner/larp-tiny"


def _no_network(*args, **kwargs):
    raise RuntimeError("a hub test tried to reach the network")


@pytest.fixture(autouse=True)
def offline_cache(tmp_path, monkeypatch) -> Path:
    """An empty hub cache in tmp_path, made the default cache; offline mode on; sockets refuse to connect."""
    from huggingface_hub import constants

    for name in ("connect", "connect_ex"):
        monkeypatch.setattr(socket.socket, name, _no_network)
    monkeypatch.setattr(socket, "create_connection", _no_network)
    monkeypatch.setattr(socket, "getaddrinfo", _no_network)
    cache = tmp_path / "hub"
    cache.mkdir()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return cache


def repo_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def add_snapshot(cache: Path, repo_id: str, files: dict[str, Path], refs: tuple[str, ...] = ("main",)) -> str:
    """Lay `files` (name in repo -> local file) out as the Hub cache does: content-named blobs, a snapshot folder of
    relative symlinks named by a fresh 40-hex commit, and `refs/<ref>` files holding that commit. Returns the commit."""
    repo, commit = repo_folder(cache, repo_id), secrets.token_hex(20)
    snapshot = repo / "snapshots" / commit
    for name, source in files.items():
        data = Path(source).read_bytes()
        blob = repo / "blobs" / hashlib.sha256(data).hexdigest()
        blob.parent.mkdir(parents=True, exist_ok=True)
        blob.write_bytes(data)
        (snapshot / name).parent.mkdir(parents=True, exist_ok=True)
        (snapshot / name).symlink_to(Path("../..") / Path(*[".."] * name.count("/")) / "blobs" / blob.name)
    snapshot.mkdir(parents=True, exist_ok=True)
    for ref in refs:
        (repo / "refs" / ref).parent.mkdir(parents=True, exist_ok=True)
        (repo / "refs" / ref).write_text(commit)  # the Hub writes the hash without a newline
    return commit


def folder_files(folder: Path) -> dict[str, Path]:
    return {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}


def clip(tok: LARPTokenizer, seed: int = 0) -> torch.Tensor:
    return torch.rand((2, *tok.video_shape), generator=torch.Generator().manual_seed(seed))  # (B, 3, T, H, W)


# ---- resolution ------------------------------------------------------------------------------------------------
def test_hub_id_resolves_to_its_snapshot_and_revision_picks_one(offline_cache, tmp_path):
    first, second = larp_tiny(0), larp_tiny(1)
    first.save_pretrained(tmp_path / "a")
    second.save_pretrained(tmp_path / "b")
    (tmp_path / "a" / "README.md").write_text("card")  # files beyond the two the loader reads are ignored
    old = add_snapshot(offline_cache, REPO, folder_files(tmp_path / "a"))
    new = add_snapshot(offline_cache, REPO, folder_files(tmp_path / "b"), refs=("v2",))

    assert resolve_folder(REPO) == repo_folder(offline_cache, REPO) / "snapshots" / old
    assert resolve_folder(REPO, revision="v2") == repo_folder(offline_cache, REPO) / "snapshots" / new
    loaded = {rev: LARPTokenizer.from_pretrained(REPO, revision=rev).codebook_hash() for rev in (None, "v2", old, new)}
    assert loaded == {None: first.codebook_hash(), "v2": second.codebook_hash(), old: first.codebook_hash(),
                      new: second.codebook_hash()}
    tok = LARPTokenizer.from_pretrained(REPO, revision="v2").eval()
    assert tok.name_or_path == REPO
    assert torch.equal(tok.tokenize(clip(tok)), second.tokenize(clip(tok)))
    # an explicit cache_dir reads that cache, not the default one
    other = tmp_path / "other-cache"
    shutil.copytree(offline_cache, other, symlinks=True)
    shutil.rmtree(repo_folder(offline_cache, REPO))
    assert LARPTokenizer.from_pretrained(REPO, cache_dir=other).codebook_hash() == first.codebook_hash()


def test_reference_checkpoint_loads_from_a_hub_cache(offline_cache, reference_fixture):
    hub_id = "hywang66/LARP-L-long-tokenizer"
    commit = add_snapshot(offline_cache, hub_id, folder_files(reference_fixture))
    from_hub, from_folder = LARPTokenizer.from_pretrained(hub_id), LARPTokenizer.from_pretrained(reference_fixture)
    assert from_hub.config.extra["path"] == str(repo_folder(offline_cache, hub_id) / "snapshots" / commit)
    assert dataclasses.replace(from_hub.config, extra={}) == dataclasses.replace(from_folder.config, extra={})
    hub_state, folder_state = from_hub.state_dict(), from_folder.state_dict()
    assert hub_state.keys() == folder_state.keys()
    assert all(torch.equal(hub_state[k], folder_state[k]) for k in hub_state)  # the same bytes read back


def test_a_local_folder_wins_over_a_cached_hub_id(offline_cache, tmp_path, monkeypatch):
    cached, local = larp_tiny(0), larp_tiny(1)
    cached.save_pretrained(tmp_path / "cached")
    add_snapshot(offline_cache, REPO, folder_files(tmp_path / "cached"))
    monkeypatch.chdir(tmp_path)
    local.save_pretrained(Path(REPO))  # ./owner/larp-tiny
    assert resolve_folder(REPO) == Path(REPO)
    assert LARPTokenizer.from_pretrained(REPO).codebook_hash() == local.codebook_hash()
    # recorded names (a bundle's base model, its LARP checkpoint) count as Hub ids only in owner/name form
    assert not is_hub_id(REPO)  # now an existing local folder
    assert is_hub_id("owner/other") and not is_hub_id("larp-tiny") and not is_hub_id(str(tmp_path / "x" / "y"))


def test_unresolvable_names_give_one_clear_error(offline_cache, tmp_path, monkeypatch):
    from huggingface_hub import constants

    with pytest.raises(FileNotFoundError, match=r"'owner/missing' \(revision 'main'\) is not in the Hub cache "
                                                r".*offline mode is on \(HF_HUB_OFFLINE=1\)"):
        LARPTokenizer.from_pretrained("owner/missing")
    larp_tiny().save_pretrained(tmp_path / "tok")
    add_snapshot(offline_cache, REPO, folder_files(tmp_path / "tok"))
    with pytest.raises(FileNotFoundError, match="revision 'nope'.*not in the Hub cache"):
        LARPTokenizer.from_pretrained(REPO, revision="nope")
    with pytest.raises(FileNotFoundError, match="neither an existing folder nor a valid Hugging Face Hub repo id"):
        LARPTokenizer.from_pretrained(tmp_path / "no" / "such" / "folder")
    with pytest.raises(NotADirectoryError, match="expected a LARP tokenizer checkpoint folder or a Hub repo id"):
        LARPTokenizer.from_pretrained(tmp_path / "tok" / "config.json")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)  # online, but told to read the cache only
    with pytest.raises(FileNotFoundError, match=r"offline mode is on \(local_files_only=True\)"):
        LARPTokenizer.from_pretrained("owner/missing", local_files_only=True)


def test_online_failures_name_their_cause(offline_cache, monkeypatch):
    """Online, snapshot_download asks the Hub first: a missing repo and an unreachable Hub read differently."""
    import httpx2
    from huggingface_hub import HfApi, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    request = httpx2.Request("GET", "https://huggingface.co/api/models/owner/missing")

    def not_found(self, *args, **kwargs):
        raise RepositoryNotFoundError("404 Repository Not Found", response=httpx2.Response(404, request=request))

    monkeypatch.setattr(HfApi, "repo_info", not_found)
    with pytest.raises(FileNotFoundError, match="no Hub repo 'owner/missing' that this token can read"):
        LARPTokenizer.from_pretrained("owner/missing")

    def unreachable(self, *args, **kwargs):
        raise httpx2.ConnectError("no route to host", request=request)

    monkeypatch.setattr(HfApi, "repo_info", unreachable)
    with pytest.raises(FileNotFoundError, match="not in the Hub cache.*the Hub could not be reached"):
        LARPTokenizer.from_pretrained("owner/missing")


# ---- push_to_hub -----------------------------------------------------------------------------------------------
@pytest.fixture
def fake_hub(offline_cache, monkeypatch) -> dict:
    """HfApi.create_repo / create_branch / upload_folder committing into the offline cache; records the calls."""
    from huggingface_hub import CommitInfo, HfApi, RepoUrl
    from huggingface_hub.utils import filter_repo_objects

    calls: dict = {"create_repo": [], "upload_folder": []}
    endpoint = "https://huggingface.co"

    def snapshot(repo_id: str, ref: str) -> Path | None:
        ref_file = repo_folder(offline_cache, repo_id) / "refs" / ref
        return repo_folder(offline_cache, repo_id) / "snapshots" / ref_file.read_text() if ref_file.is_file() else None

    def create_repo(self, repo_id, *, private=None, exist_ok=False, **kwargs):
        calls["create_repo"].append((repo_id, private, exist_ok))
        return RepoUrl(f"{endpoint}/{repo_id}", endpoint=endpoint)

    def create_branch(self, repo_id, *, branch, exist_ok=False, **kwargs):
        repo = repo_folder(offline_cache, repo_id)
        if not (repo / "refs" / branch).exists() and (repo / "refs" / "main").exists():
            (repo / "refs" / branch).write_text((repo / "refs" / "main").read_text())

    def upload_folder(self, *, repo_id, folder_path, revision=None, commit_message=None, delete_patterns=None,
                      **kwargs):
        calls["upload_folder"].append(dict(repo_id=repo_id, revision=revision, files=sorted(folder_files(
            Path(folder_path))), delete_patterns=delete_patterns))
        parent = snapshot(repo_id, revision or "main")
        kept = folder_files(parent) if parent else {}
        for name in filter_repo_objects(list(kept), allow_patterns=delete_patterns) if delete_patterns else []:
            del kept[name]
        commit = add_snapshot(offline_cache, repo_id, {**kept, **folder_files(Path(folder_path))},
                              refs=(revision or "main",))
        return CommitInfo(commit_url=f"{endpoint}/{repo_id}/commit/{commit}", commit_message=commit_message,
                          commit_description="", oid=commit, _endpoint=endpoint)

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_branch", create_branch)
    monkeypatch.setattr(HfApi, "upload_folder", upload_folder)
    return calls


def test_tokenizer_push_to_hub_round_trip(fake_hub):
    tok = larp_tiny(0)
    info = tok.push_to_hub("me/larp", private=True)
    assert info == f"https://huggingface.co/me/larp/commit/{info.oid}" and info.repo_url.repo_id == "me/larp"
    assert fake_hub["create_repo"] == [("me/larp", True, True)]
    assert fake_hub["upload_folder"][0]["files"] == ["config.json", "model.safetensors"]

    again = LARPTokenizer.from_pretrained("me/larp", revision=info.oid).eval()
    video = clip(tok)
    codes = tok.tokenize(video)
    assert torch.equal(again.tokenize(video), codes)
    torch.testing.assert_close(again.decode_codes(codes), tok.decode_codes(codes), rtol=1e-6, atol=1e-6)

    other = larp_tiny(1)
    other.push_to_hub("me/larp", revision="v2")  # a new branch; main keeps the first tokenizer
    assert LARPTokenizer.from_pretrained("me/larp").codebook_hash() == tok.codebook_hash()
    assert LARPTokenizer.from_pretrained("me/larp", revision="v2").codebook_hash() == other.codebook_hash()


@torch.no_grad()
def test_video_llm_push_to_hub_round_trip(fake_hub):
    from llm_adapters.loading import load_video_llm
    from llm_adapters.model import VideoLLM, check_inputs, extend_llm

    larp = larp_tiny()
    base = tiny_llm_dir("llama", False)
    video_llm = extend_llm(*tiny_llm("llama", False), larp, lora=dict(r=4, lora_alpha=8))
    perturb_([p for p in video_llm.model.parameters() if p.requires_grad])  # stands in for training
    video_llm.model.eval()
    batch = check_inputs(video_llm.tokenizer, video_llm.vocab)
    want = [video_llm.model(input_ids=ids).logits for ids in batch]
    video_llm.push_to_hub("me/video-llm")
    pushed = fake_hub["upload_folder"][0]
    assert {"adapter_model.safetensors", "video_adapter.safetensors", "video_llm.json"} <= set(pushed["files"])

    again = VideoLLM.from_pretrained("me/video-llm", base_model=base, larp_tokenizer=larp)
    assert again.vocab == video_llm.vocab and again.config == video_llm.config
    for w, ids in zip(want, batch):
        assert_logits_close(again.model(input_ids=ids).logits, w)
    assert load_video_llm("me/video-llm", base_model=str(base)).vocab == video_llm.vocab

    # a later bundle without LoRA replaces the first: its stale peft files leave the repo in the same commit
    plain = extend_llm(*tiny_llm("llama", False), larp, lora=None)
    plain.push_to_hub("me/video-llm")
    files = set(folder_files(resolve_folder("me/video-llm")))
    assert "video_adapter.safetensors" in files and not files & {"adapter_config.json", "adapter_model.safetensors"}
    assert VideoLLM.from_pretrained("me/video-llm", base_model=base).config.lora is False

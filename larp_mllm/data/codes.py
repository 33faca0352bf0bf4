"""Code shards: the files that carry LARP codes from stage 1 (``larp-extract-codes``) to stage 2 (the LLM).

A code folder holds

- ``codes-00000-of-00012.safetensors`` ... one file per shard. Shard ``i`` covers the examples
  ``[i * shard_size, min((i + 1) * shard_size, num_examples))`` of the extraction's example list, so a rerun writes
  the same shards whatever the number of processes. Tensors: ``codes`` (n, N) int16 (int32 when the codebook has more
  than 32767 codes), ``labels`` / ``video_index`` / ``chunk`` (n,) int64, ``flip_codes`` (n, N) when the
  horizontally flipped clips were coded too, and ``cond_codes`` (n, N) when the continuation condition clips were
  (``larp_mllm.data.continuation``: the first ``condition_frames`` frames, the last of them repeated; unflipped).
  Examples that could not be read are left out (n <= slice length). The safetensors metadata holds one key,
  ``larp_codes``: a JSON ``ShardHeader`` (run key, shard slice, skips and their kinds, codebook).
- ``manifest.json``: a ``CodeManifest`` (codebook hash, tokens per video, codebook size, LARP checkpoint, extraction
  settings (``condition_frames``: 0 = no condition codes; manifests older than it load as 0), class names, one
  ``VideoEntry`` per video (path, label, class name, caption), one ``ShardEntry`` per shard).

All files are written atomically (``larp_mllm.runtime.files.atomic_write``: a per-process temporary file, then
``os.replace``); a shard on disk is therefore complete. A listed shard that is missing, cut or unreadable, or holds
codes outside the codebook, means the folder was damaged afterwards: ``load_code_shards`` refuses it with one
``CodeFolderError`` naming the file (training data is never skipped silently).

    codes = load_code_shards("runs/codes/ucf101_train")   # CodeSet: codes (M, N) int64, labels (M,), captions ...
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from larp_mllm.runtime.files import atomic_write, atomic_write_text, remove_stale_temporaries

FORMAT = "larp-codes"
FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
_META_KEY = "larp_codes"
_REDO = "extract the codes again (larp-extract-codes) into a fresh folder"


class CodeFolderError(ValueError):
    """A code folder is damaged: a listed shard is missing, unreadable or inconsistent with its manifest."""


@dataclass
class VideoEntry:
    """One source video of a code folder."""

    path: str
    label: int = -1
    class_name: str = ""
    caption: str = ""


@dataclass
class ShardEntry:
    """One shard file: its example slice ``[start, end)``, codes kept and examples skipped."""

    file: str
    start: int
    end: int
    num_codes: int
    num_skipped: int
    faults: dict[str, int] = field(default_factory=dict)  # the skipped examples by kind (larp_mllm.data.faults)


@dataclass
class ShardHeader:
    """Metadata stored inside every shard file (identifies the run that wrote it)."""

    run_key: str
    shard: int
    num_shards: int
    start: int
    end: int
    num_skipped: int
    codebook_hash: str
    num_tokens: int
    codebook_size: int
    format: str = FORMAT
    version: int = FORMAT_VERSION
    faults: dict[str, int] = field(default_factory=dict)  # the skipped examples by kind


@dataclass
class CodeManifest:
    """``manifest.json`` of a code folder. ``run_key`` is a hash of everything that decides the shard contents."""

    run_key: str
    codebook_hash: str
    num_tokens: int
    codebook_size: int
    larp_checkpoint: str
    dataset: str  # how the example list was made, e.g. "csv:data/ucf101_train.csv"
    mode: str  # "chunks" or "random"
    num_frames: int
    size: int
    seed: int
    has_flip: bool
    shard_size: int
    num_examples: int
    num_index_skipped: int  # videos left out of the chunk index (unreadable or too short)
    class_names: list[str]
    videos: list[VideoEntry]
    shards: list[ShardEntry] = field(default_factory=list)
    format: str = FORMAT
    version: int = FORMAT_VERSION
    index_faults: dict[str, int] = field(default_factory=dict)  # videos left out of the chunk index, by kind
    data_faults: dict[str, int] = field(default_factory=dict)  # by kind: index_faults + the shards' (finalize)
    condition_frames: int = 0  # frames of each clip's continuation condition coded as cond_codes; 0 = none

    def save(self, directory: str | os.PathLike) -> Path:
        path = Path(directory) / MANIFEST_NAME
        atomic_write_text(path, json.dumps(asdict(self), indent=1))
        return path

    @classmethod
    def load(cls, directory: str | os.PathLike) -> "CodeManifest":
        path = Path(directory) / MANIFEST_NAME
        if not path.is_file():
            raise FileNotFoundError(
                f"no {MANIFEST_NAME} in {directory}: the extraction is unfinished (rerun larp-extract-codes with the "
                "same arguments, or add --finalize once every shard is written)"
            )
        try:
            raw = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise CodeFolderError(f"{path} is not readable JSON ({err}): the code folder is damaged; {_REDO}") from None
        if not isinstance(raw, dict) or raw.get("format") != FORMAT:
            found = raw.get("format") if isinstance(raw, dict) else type(raw).__name__
            raise ValueError(f"{path} is not a {FORMAT} manifest (format={found!r})")
        known = {f.name for f in fields(cls)}
        raw = {k: v for k, v in raw.items() if k in known}
        raw["videos"] = [VideoEntry(**v) for v in raw["videos"]]
        raw["shards"] = [ShardEntry(**s) for s in raw["shards"]]
        return cls(**raw)


@dataclass
class ShardData:
    """The contents of one shard. codes / flip_codes / cond_codes: (n, N) integer; labels, video_index, chunk: (n,)
    int64."""

    codes: torch.Tensor
    labels: torch.Tensor
    video_index: torch.Tensor
    chunk: torch.Tensor
    flip_codes: torch.Tensor | None = None
    cond_codes: torch.Tensor | None = None  # codes of the continuation condition clips (unflipped)


@dataclass
class CodeSet:
    """All codes of a code folder, in example order. ``captions[i]`` / ``labels[i]`` belong to ``codes[i]``."""

    codes: torch.Tensor  # (M, N) int64
    labels: torch.Tensor  # (M,) int64, -1 when unlabelled
    captions: list[str]  # (M,) "" when absent
    class_names: list[str]  # class_names[label]
    video_index: torch.Tensor  # (M,) int64 index into video_paths
    chunk: torch.Tensor  # (M,) int64 chunk index (-1 for a random window)
    codebook_hash: str
    num_tokens: int
    codebook_size: int
    flip_codes: torch.Tensor | None = None  # (M, N) int64 codes of the horizontally flipped clips
    video_paths: list[str] = field(default_factory=list)
    larp_checkpoint: str = ""
    cond_codes: torch.Tensor | None = None  # (M, N) int64 codes of the condition clips (continuation), or None
    condition_frames: int = 0  # frames kept in each condition clip; 0 when cond_codes is None

    def __len__(self) -> int:
        return self.codes.shape[0]


def shard_file_name(shard: int, num_shards: int) -> str:
    return f"codes-{shard:05d}-of-{num_shards:05d}.safetensors"


def read_shard_header(path: str | os.PathLike) -> ShardHeader:
    """The ``ShardHeader`` of a shard file (reads only the file's header)."""
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if _META_KEY not in meta:
        raise ValueError(f"{path} is not a {FORMAT} shard (no {_META_KEY!r} metadata)")
    return ShardHeader(**json.loads(meta[_META_KEY]))


def read_shard(path: str | os.PathLike) -> tuple[ShardHeader, ShardData]:
    """Header and contents of one shard (codes converted to int64); CodeFolderError, naming the file, when it is
    missing or cannot be read."""
    if not Path(path).is_file():
        raise CodeFolderError(f"code shard {path} is missing: the code folder is damaged; {_REDO}")
    try:
        header = read_shard_header(path)
        t = load_file(str(path))
        flip = t["flip_codes"].long() if "flip_codes" in t else None
        cond = t["cond_codes"].long() if "cond_codes" in t else None
        return header, ShardData(t["codes"].long(), t["labels"], t["video_index"], t["chunk"], flip, cond)
    except Exception as err:  # noqa: BLE001 - safetensors' errors do not name the file
        raise CodeFolderError(f"code shard {path} cannot be read ({type(err).__name__}: {err}): the code folder is "
                              f"damaged; {_REDO}") from None


def _check_shard(path: Path, data: ShardData, manifest: "CodeManifest") -> None:
    """CodeFolderError unless the shard's tensors fit the manifest: N tokens per row and codes in [0, K) (codes,
    flip_codes, cond_codes; cond_codes present exactly when the manifest's condition_frames > 0), one label, video
    index and chunk per row, video indices within the manifest's videos."""
    n = data.codes.shape[0]
    problems = []
    if (data.cond_codes is not None) != (manifest.condition_frames > 0):
        problems.append(f"{'no ' if data.cond_codes is None else ''}cond_codes while the manifest's condition_frames "
                        f"is {manifest.condition_frames}")
    for name in ("codes", "flip_codes", "cond_codes"):
        codes = getattr(data, name)
        if codes is None:
            continue
        if codes.ndim != 2 or codes.shape != (n, manifest.num_tokens):
            problems.append(f"{name} of shape {tuple(codes.shape)}, not ({n}, {manifest.num_tokens})")
        elif n and (int(codes.min()) < 0 or int(codes.max()) >= manifest.codebook_size):
            problems.append(f"{name} outside [0, {manifest.codebook_size})")
    if any(t.shape[0] != n for t in (data.labels, data.video_index, data.chunk)):
        problems.append("a different number of labels / video indices / chunks than codes")
    elif n and (int(data.video_index.min()) < 0 or int(data.video_index.max()) >= len(manifest.videos)):
        problems.append(f"video indices outside the manifest's {len(manifest.videos)} videos")
    if problems:
        raise CodeFolderError(f"code shard {path} holds {'; '.join(problems)}: the code folder is damaged; {_REDO}")


class CodeShardWriter:
    """Writes the shards of one extraction run and its manifest; knows which shards are already done.

    A shard file already on disk with the same ``run_key`` counts as done (it was written atomically); one with another
    run key means the folder belongs to a different run, which is an error unless ``overwrite``.
    """

    def __init__(self, out_dir: str | os.PathLike, run_key: str, num_shards: int, codebook_hash: str,
                 num_tokens: int, codebook_size: int, overwrite: bool = False):
        self.out_dir = Path(out_dir)
        self.run_key, self.num_shards = run_key, num_shards
        self.codebook_hash, self.num_tokens, self.codebook_size = codebook_hash, num_tokens, codebook_size
        self.out_dir.mkdir(parents=True, exist_ok=True)
        manifest = self.out_dir / MANIFEST_NAME
        foreign = [p for p in sorted(self.out_dir.glob("codes-*.safetensors")) if not self._ours(p)]
        if foreign or (manifest.is_file() and json.loads(manifest.read_text()).get("run_key") != run_key):
            if not overwrite:
                raise ValueError(f"{self.out_dir} holds codes of a different extraction run; use another output "
                                 "folder or --overwrite")
            for p in foreign:
                p.unlink()
            manifest.unlink(missing_ok=True)

    def _ours(self, path: Path) -> bool:
        """True for a shard file of this run (or an unreadable one, which gets rewritten)."""
        if path.name not in {shard_file_name(i, self.num_shards) for i in range(self.num_shards)}:
            return False
        try:
            return read_shard_header(path).run_key == self.run_key
        except Exception:  # noqa: BLE001
            return True

    def shard_path(self, shard: int) -> Path:
        return self.out_dir / shard_file_name(shard, self.num_shards)

    def is_done(self, shard: int) -> bool:
        path = self.shard_path(shard)
        if not path.is_file():
            return False
        try:
            header = read_shard_header(path)
        except Exception:  # noqa: BLE001 - an unreadable shard is redone
            return False
        return header.run_key == self.run_key

    def missing(self) -> list[int]:
        return [i for i in range(self.num_shards) if not self.is_done(i)]

    def write(self, shard: int, start: int, end: int, data: ShardData, num_skipped: int,
              faults: dict[str, int] | None = None) -> Path:
        """Write shard ``shard`` (examples ``[start, end)``, ``num_skipped`` of them unreadable; `faults`: those
        by kind) atomically."""
        code_dtype = torch.int16 if self.codebook_size <= 2**15 - 1 else torch.int32
        tensors = {
            "codes": data.codes.to(torch.int64).reshape(-1, self.num_tokens).to(code_dtype).contiguous(),
            "labels": data.labels.to(torch.int64).contiguous(),
            "video_index": data.video_index.to(torch.int64).contiguous(),
            "chunk": data.chunk.to(torch.int64).contiguous(),
        }
        for name in ("flip_codes", "cond_codes"):
            codes = getattr(data, name)
            if codes is not None:
                tensors[name] = codes.to(torch.int64).reshape(-1, self.num_tokens).to(code_dtype)  # (n, N)
        header = ShardHeader(self.run_key, shard, self.num_shards, start, end, num_skipped, self.codebook_hash,
                             self.num_tokens, self.codebook_size, faults=dict(faults or {}))

        metadata = {_META_KEY: json.dumps(asdict(header))}

        def save(tmp: Path) -> None:
            save_file({k: v.cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
            os.chmod(tmp, 0o644)  # safetensors creates 0600 files; shards are meant to be shared

        return atomic_write(self.shard_path(shard), save)

    def finalize(self, manifest: CodeManifest) -> Path:
        """Write ``manifest.json`` listing every shard; raises ValueError while shards are missing."""
        missing = self.missing()
        if missing:
            raise ValueError(f"{len(missing)} of {self.num_shards} shards are not written yet (first: {missing[0]})")
        manifest.shards, manifest.data_faults = [], dict(manifest.index_faults)
        for i in range(self.num_shards):
            h = read_shard_header(self.shard_path(i))
            with safe_open(str(self.shard_path(i)), framework="pt") as f:
                n = f.get_slice("codes").get_shape()[0]
            manifest.shards.append(ShardEntry(self.shard_path(i).name, h.start, h.end, n, h.num_skipped, h.faults))
            for kind, count in h.faults.items():
                manifest.data_faults[kind] = manifest.data_faults.get(kind, 0) + count
        remove_stale_temporaries(self.out_dir, "codes-*")  # from killed writers; every shard is on disk now
        return manifest.save(self.out_dir)


def load_code_shards(directory: str | os.PathLike) -> CodeSet:
    """Read every shard listed by ``directory/manifest.json`` into one ``CodeSet``."""
    directory = Path(directory)
    manifest = CodeManifest.load(directory)
    parts: list[ShardData] = []
    for entry in manifest.shards:
        header, data = read_shard(directory / entry.file)
        if header.run_key != manifest.run_key or header.codebook_hash != manifest.codebook_hash:
            raise ValueError(f"{entry.file} was written by another extraction run than {MANIFEST_NAME} describes")
        _check_shard(directory / entry.file, data, manifest)
        parts.append(data)
    n = manifest.num_tokens
    codes = torch.cat([p.codes for p in parts]) if parts else torch.empty(0, n, dtype=torch.long)
    video_index = torch.cat([p.video_index for p in parts]) if parts else torch.empty(0, dtype=torch.long)
    has_flip = bool(parts) and all(p.flip_codes is not None for p in parts)
    cond_codes = None
    if manifest.condition_frames > 0:  # every shard holds them (_check_shard)
        cond_codes = torch.cat([p.cond_codes for p in parts]) if parts else torch.empty(0, n, dtype=torch.long)
    return CodeSet(
        codes=codes,
        labels=torch.cat([p.labels for p in parts]) if parts else torch.empty(0, dtype=torch.long),
        captions=[manifest.videos[v].caption for v in video_index.tolist()],
        class_names=list(manifest.class_names),
        video_index=video_index,
        chunk=torch.cat([p.chunk for p in parts]) if parts else torch.empty(0, dtype=torch.long),
        codebook_hash=manifest.codebook_hash,
        num_tokens=manifest.num_tokens,
        codebook_size=manifest.codebook_size,
        flip_codes=torch.cat([p.flip_codes for p in parts]) if has_flip else None,  # type: ignore[misc]
        video_paths=[v.path for v in manifest.videos],
        larp_checkpoint=manifest.larp_checkpoint,
        cond_codes=cond_codes,  # type: ignore[arg-type]
        condition_frames=manifest.condition_frames,
    )

"""Video lists: records from reference-format CSVs, UCF101 folders with the official split files, any folder of
videos (class = sub-folder), or ``path,caption`` CSVs. A ``VideoRecord`` is one file with its label, class name and
caption; ``ClipDataset`` (larp_mllm.data.clips) reads clips from a list of them.

    records = ucf101_records("data/UCF-101", "data/ucfTrainTestlist", split=1, subset="train")

Every CLI that reads a dataset takes the same options (``add_dataset_args``) and builds its records from them
(``records_from_args``): ``--csv`` (+ ``--root``), ``--ucf101-root`` + ``--ucf101-splits`` (+ ``--split``,
``--subset``), ``--folder`` or ``--caption-csv``, and ``--workers``.
"""
from __future__ import annotations

import argparse
import csv
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, Sequence

from larp_mllm.data.faults import DEFAULT_MAX_BAD_FRACTION
from larp_mllm.data.video_io import VIDEO_EXTENSIONS

logger = logging.getLogger(__name__)
_UCF_NAME = re.compile(r"^v_([A-Za-z0-9]+)_g\d+_c\d+$")


@dataclass(frozen=True)
class VideoRecord:
    """One video: its file, integer label (-1 when unlabelled), class name and caption ("" when absent)."""

    path: Path
    label: int = -1
    class_name: str = ""
    caption: str = ""


# ----------------------------------------------------------------------------------------------------------------
# Record lists
# ----------------------------------------------------------------------------------------------------------------
def ucf_action(path: str | os.PathLike) -> str:
    """Action name in a UCF101 file name ``v_<Action>_gXX_cYY.avi`` (e.g. "ApplyEyeMakeup")."""
    match = _UCF_NAME.match(Path(path).stem)
    if match is None:
        raise ValueError(f"expected a UCF101 file name like v_ApplyEyeMakeup_g08_c01.avi, got {Path(path).name!r}")
    return match.group(1)


def _read_csv(csv_path: str | os.PathLike, required: Sequence[str]) -> list[dict[str, str]]:
    csv_path = Path(csv_path)
    if not csv_path.is_file():
        raise FileNotFoundError(f"CSV file not found: {csv_path}")
    with open(csv_path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ValueError(f"{csv_path} needs a header with the columns {list(required)}; missing {missing}")
        rows = list(reader)
    if not rows:
        raise ValueError(f"{csv_path} has no rows")
    return rows


def _resolver(csv_path: Path, root: str | os.PathLike | None, first: str):
    """Relative paths resolve against ``root``; by default against the CSV's folder, or the working directory when
    the first row only exists there (the reference writes paths relative to its repo root)."""
    if root is None:
        base = csv_path.resolve().parent
        if not (base / first).exists() and Path(first).exists():
            base = Path.cwd()
    else:
        base = Path(root)
    return lambda p: Path(p) if Path(p).is_absolute() else base / p


def csv_records(csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[VideoRecord]:
    """Records from a CSV in the reference format ``id,path,action,label`` (optional ``caption`` column).

    As in the reference, a CSV whose file name starts with "ucf" gets its labels recomputed from the file names
    ``v_<Action>_gXX_cYY``: the index of the action among the alphabetically sorted actions of the CSV. Other CSVs
    keep their ``label`` column (-1 when absent or empty) and take the class name from ``action``.
    """
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path, ["path"])
    resolve = _resolver(csv_path, root, rows[0]["path"])
    if csv_path.stem.startswith("ucf"):
        actions = [ucf_action(r["path"]) for r in rows]
        names = sorted(set(actions))
        if len(names) != 101:
            logger.warning("%s: UCF labels over %d actions (UCF101 has 101)", csv_path.name, len(names))
        to_label = {name: i for i, name in enumerate(names)}
        return [VideoRecord(resolve(r["path"]), to_label[a], a, r.get("caption") or "") for r, a in zip(rows, actions)]
    return [
        VideoRecord(resolve(r["path"]), int(r["label"]) if (r.get("label") or "").strip() else -1,
                    r.get("action") or "", r.get("caption") or "")
        for r in rows
    ]


def ucf101_records(
    root: str | os.PathLike,
    splits_dir: str | os.PathLike,
    split: int = 1,
    subset: Literal["train", "test"] = "train",
) -> list[VideoRecord]:
    """Records of a UCF101 folder (``root/<Class>/v_<Class>_gXX_cYY.avi``) listed by the official split files.

    ``splits_dir`` holds ``classInd.txt`` and ``trainlist0N.txt`` / ``testlist0N.txt``. Labels are indices into the
    alphabetically sorted (Python ``sorted``) class names, which is how the reference numbers UCF101 classes (this
    differs from ``classInd.txt``'s 1-based order, e.g. HammerThrow sorts before Hammering).
    """
    if subset not in ("train", "test"):
        raise ValueError(f"subset must be 'train' or 'test', got {subset!r}")
    splits_dir = Path(splits_dir)
    class_file, list_file = splits_dir / "classInd.txt", splits_dir / f"{subset}list{split:02d}.txt"
    for f in (class_file, list_file):
        if not f.is_file():
            raise FileNotFoundError(f"expected the UCF101 split file {f} (from UCF101TrainTestSplits-RecognitionTask)")
    names = sorted(line.split()[1] for line in class_file.read_text().splitlines() if line.strip())
    to_label = {name: i for i, name in enumerate(names)}
    by_lower = {name.lower(): name for name in names}  # file names spell HandstandPushups as HandStandPushups
    records = []
    for line in list_file.read_text().splitlines():
        if not line.strip():
            continue
        rel = Path(line.split()[0])
        name = rel.parent.name if rel.parent.name else by_lower.get(ucf_action(rel).lower(), "")
        if name not in to_label:
            raise ValueError(f"{list_file}: class of {rel} ({name!r}) is not in {class_file.name}")
        records.append(VideoRecord(Path(root) / rel, to_label[name], name))
    if not records:
        raise ValueError(f"{list_file} lists no videos")
    return records


def folder_records(root: str | os.PathLike, extensions: Sequence[str] = VIDEO_EXTENSIONS) -> list[VideoRecord]:
    """Records of every video file under ``root`` (by extension); class = first sub-folder, labels by sorted name.

    Files directly in ``root`` get label -1. Hidden files and folders are ignored.
    """
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"video folder not found: {root}")
    exts = {e.lower() for e in extensions}
    files = sorted(
        p for p in root.rglob("*")
        if p.is_file() and p.suffix.lower() in exts and not any(s.startswith(".") for s in p.relative_to(root).parts)
    )
    if not files:
        raise ValueError(f"no video files ({', '.join(sorted(exts))}) under {root}")
    classes = sorted({p.relative_to(root).parts[0] for p in files if len(p.relative_to(root).parts) > 1})
    to_label = {name: i for i, name in enumerate(classes)}
    records = []
    for p in files:
        parts = p.relative_to(root).parts
        name = parts[0] if len(parts) > 1 else ""
        records.append(VideoRecord(p, to_label.get(name, -1), name))
    return records


def caption_csv_records(csv_path: str | os.PathLike, root: str | os.PathLike | None = None) -> list[VideoRecord]:
    """Records from a CSV with the columns ``path,caption`` (text-to-video); labels are -1."""
    csv_path = Path(csv_path)
    rows = _read_csv(csv_path, ["path", "caption"])
    resolve = _resolver(csv_path, root, rows[0]["path"])
    return [VideoRecord(resolve(r["path"]), caption=r["caption"]) for r in rows]


def class_names_of(records: Sequence[VideoRecord]) -> list[str]:
    """``names[label]`` for the labels used by ``records`` ("" for a label with no named record)."""
    num = max((r.label for r in records), default=-1) + 1
    names = [""] * num
    for r in records:
        if r.label >= 0 and not names[r.label]:
            names[r.label] = r.class_name
    return names


# ----------------------------------------------------------------------------------------------------------------
# The dataset options of every CLI
# ----------------------------------------------------------------------------------------------------------------
def add_dataset_args(parser: argparse.ArgumentParser) -> None:
    """Add the dataset options, spelled the same in every CLI: one of --csv, --ucf101-root, --folder, --caption-csv
    (checked by ``records_from_args``), their companions, --workers (DataLoader worker processes) and
    --max-bad-fraction (the share of bad videos that stops a job, larp_mllm.data.faults)."""
    g = parser.add_argument_group("dataset (one of --csv, --ucf101-root, --folder, --caption-csv)")
    g.add_argument("--csv", help="reference-format CSV (id,path,action,label[,caption]) or the synthetic set's CSV")
    g.add_argument("--ucf101-root", help="UCF101 video folder (<Class>/v_<Class>_gXX_cYY.avi); needs --ucf101-splits")
    g.add_argument("--folder", help="any folder of videos (class = sub-folder)")
    g.add_argument("--caption-csv", help="CSV with the columns path,caption (unlabelled)")
    g.add_argument("--root", help="folder that relative CSV paths start from (default: the CSV's folder)")
    g.add_argument("--ucf101-splits", help="folder with classInd.txt, trainlist0N.txt, testlist0N.txt")
    g.add_argument("--split", type=int, default=1, help="UCF101 split (1..3)")
    g.add_argument("--subset", default="train", choices=["train", "test"], help="UCF101 subset")
    g.add_argument("--workers", type=int, default=2, help="DataLoader worker processes (0: read in this process)")
    g.add_argument("--max-bad-fraction", type=float, default=DEFAULT_MAX_BAD_FRACTION,
                   help="stop with an error (the counts by kind, a few paths) when more than this share of the videos "
                        "or clips read could not be used: missing, unreadable, too short, wrong size (1: never)")


def dataset_source(args: argparse.Namespace) -> str:
    """One line naming the dataset the options of ``add_dataset_args`` select (e.g. "csv:data/ucf101_train.csv");
    ValueError unless exactly one dataset is given (and --ucf101-root comes with --ucf101-splits)."""
    given = {"csv": args.csv, "ucf101": args.ucf101_root, "folder": args.folder, "caption-csv": args.caption_csv}
    given = {kind: value for kind, value in given.items() if value}
    if len(given) != 1:
        raise ValueError("give exactly one dataset: --csv, --ucf101-root (+ --ucf101-splits), --folder or "
                         "--caption-csv")
    (kind, value), = given.items()
    if kind == "ucf101":
        if not args.ucf101_splits:
            raise ValueError("--ucf101-root needs --ucf101-splits (the folder with trainlist01.txt ...)")
        return f"ucf101:{value} split {args.split} {args.subset}"
    return f"{kind}:{value}"


def records_from_args(args: argparse.Namespace) -> list[VideoRecord]:
    """The records of the dataset the options of ``add_dataset_args`` select (checked as in ``dataset_source``)."""
    kind = dataset_source(args).split(":", 1)[0]
    if kind == "csv":
        return csv_records(args.csv, args.root)
    if kind == "ucf101":
        return ucf101_records(args.ucf101_root, args.ucf101_splits, args.split, args.subset)
    if kind == "folder":
        return folder_records(args.folder)
    return caption_csv_records(args.caption_csv, args.root)

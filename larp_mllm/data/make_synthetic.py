"""larp-make-synthetic: write the labelled synthetic video set (larp_mllm.data.synthetic) to a folder.

    larp-make-synthetic --output-dir runs/synthetic --classes 8 --per-class 20 [--seed 0 --frames 16 --size 64]
    python -m larp_mllm.data.make_synthetic ...                                      # the same

A composition split instead of the first N classes: the classes are the product of attribute lists (each defaults to
every value), ``--hold-out K`` of those combinations are left out (every value, and wherever possible every
attribute pair, of a held-out combination stays seen), and ``held_out.json`` beside the CSV lists the split.
``--only-held-out`` renders the held-out combinations instead: an evaluation set (give it another ``--seed``; the
split depends on ``--split-seed`` only, so both runs agree on it).

    larp-make-synthetic --output-dir runs/comp/train --per-class 20 --colors red,green,blue \\
        --shapes circle,square,triangle --directions right,left,up,down --hold-out 6
    larp-make-synthetic --output-dir runs/comp/eval --per-class 4 --seed 1 --colors red,green,blue \\
        --shapes circle,square,triangle --directions right,left,up,down --hold-out 6 --only-held-out

Prints the path of the written ``synthetic.csv``.
"""
from __future__ import annotations

import argparse

from larp_mllm.data.synthetic import (BACKGROUNDS, COLORS, DIRECTIONS, MAX_CLASSES, OBJECT_SIZES, SHAPES,
                                      ClassSpec, composition_split, make_synthetic_dataset)


def _values(text: str | None, default: list[str]) -> list[str]:
    return default if text is None else [v.strip() for v in text.split(",") if v.strip()]


def _classes(args: argparse.Namespace) -> tuple[int | list[ClassSpec], list[ClassSpec]]:
    """(classes, held_out) from the flags; ValueError when the class flags are missing or mixed."""
    composition = [args.colors, args.shapes, args.directions, args.hold_out]
    if args.classes is not None:
        if any(v is not None for v in composition) or args.only_held_out:
            raise ValueError("--classes N picks the first N classes; it does not combine with --colors, --shapes, "
                             "--directions, --hold-out or --only-held-out")
        return args.classes, []
    if all(v is None for v in composition):
        raise ValueError("expected --classes N, or attribute lists (--colors, --shapes, --directions) and "
                         "--hold-out K")
    return composition_split(_values(args.colors, list(COLORS)), _values(args.shapes, list(SHAPES)),
                             _values(args.directions, list(DIRECTIONS)), args.hold_out or 0, args.split_seed)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="output folder")
    parser.add_argument("--classes", type=int, default=None, help=f"number of classes (1..{MAX_CLASSES})")
    parser.add_argument("--per-class", type=int, required=True, help="videos per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--background", default="textured", choices=BACKGROUNDS,
                        help="textured: striped/checkered/dotted/cloudy per clip; plain: a tint with a soft gradient")
    parser.add_argument("--object-size", default="small", choices=sorted(OBJECT_SIZES),
                        help="shape radius: small = 10-18%% of the frame, large = 20-30%%")
    split = parser.add_argument_group("composition split (instead of --classes)")
    split.add_argument("--colors", default=None, help=f"comma-separated subset of {','.join(COLORS)} (default: all)")
    split.add_argument("--shapes", default=None, help=f"comma-separated subset of {','.join(SHAPES)} (default: all)")
    split.add_argument("--directions", default=None,
                       help=f"comma-separated subset of {','.join(DIRECTIONS)} (default: all)")
    split.add_argument("--hold-out", type=int, default=None, help="combinations held out of the set (default 0)")
    split.add_argument("--split-seed", type=int, default=0, help="seed of the split (not of the clips)")
    split.add_argument("--only-held-out", action="store_true", help="render the held-out combinations instead")
    args = parser.parse_args(argv)
    try:
        classes, held_out = _classes(args)
        path = make_synthetic_dataset(args.output_dir, classes, args.per_class, args.seed, args.frames, args.size,
                                      args.fps, args.background, args.object_size, held_out=held_out,
                                      only_held_out=args.only_held_out)
    except ValueError as e:
        parser.error(str(e))
    print(path)


if __name__ == "__main__":
    main()

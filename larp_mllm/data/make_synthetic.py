"""larp-make-synthetic: write the labelled synthetic video set (larp_mllm.data.synthetic) to a folder.

    larp-make-synthetic --output-dir runs/synthetic --classes 8 --per-class 20 [--seed 0 --frames 16 --size 64]
    python -m larp_mllm.data.make_synthetic ...                                      # the same

Prints the path of the written ``synthetic.csv``.
"""
from __future__ import annotations

import argparse

from larp_mllm.data.synthetic import BACKGROUNDS, MAX_CLASSES, OBJECT_SIZES, make_synthetic_dataset


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", required=True, help="output folder")
    parser.add_argument("--classes", type=int, required=True, help=f"number of classes (1..{MAX_CLASSES})")
    parser.add_argument("--per-class", type=int, required=True, help="videos per class")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--frames", type=int, default=16)
    parser.add_argument("--size", type=int, default=64)
    parser.add_argument("--fps", type=float, default=8)
    parser.add_argument("--background", default="textured", choices=BACKGROUNDS,
                        help="textured: striped/checkered/dotted/cloudy per clip; plain: a tint with a soft gradient")
    parser.add_argument("--object-size", default="small", choices=sorted(OBJECT_SIZES),
                        help="shape radius: small = 10-18%% of the frame, large = 20-30%%")
    args = parser.parse_args(argv)
    try:
        path = make_synthetic_dataset(args.output_dir, args.classes, args.per_class, args.seed, args.frames, args.size,
                                      args.fps, args.background, args.object_size)
    except ValueError as e:
        parser.error(str(e))
    print(path)


if __name__ == "__main__":
    main()

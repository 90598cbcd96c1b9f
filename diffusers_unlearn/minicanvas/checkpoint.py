"""The MiniCanvas weights folder: save, sha256 manifest, verified offline loading.

Layout::

    weights/
      manifest.json          sha256 and size of every file below, training report, measured quality
      pipeline/              a standard StableDiffusionPipeline folder (model_index.json, unet/, vae/, ...)
      classifiers/           config.json, style.safetensors, object.safetensors
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from .classifier import ConceptClassifier, ConceptClassifierNet

__all__ = [
    "DEFAULT_WEIGHTS_DIR",
    "MANIFEST_NAME",
    "MiniCanvasWeightsError",
    "load_classifiers_from",
    "load_pipeline_from",
    "read_manifest",
    "record_quality",
    "save_weights",
    "verify_weights",
    "weights_size",
]

DEFAULT_WEIGHTS_DIR = Path(__file__).resolve().parent / "weights"
MANIFEST_NAME = "manifest.json"
MANIFEST_FORMAT = 1
# Files that any valid weights folder must list; a manifest without them is itself corrupt.
REQUIRED_FILES = (
    "pipeline/model_index.json",
    "pipeline/unet/config.json",
    "pipeline/unet/diffusion_pytorch_model.safetensors",
    "pipeline/vae/config.json",
    "pipeline/vae/diffusion_pytorch_model.safetensors",
    "pipeline/text_encoder/config.json",
    "pipeline/text_encoder/model.safetensors",
    "pipeline/tokenizer/tokenizer.json",
    "pipeline/tokenizer/tokenizer_config.json",
    "pipeline/scheduler/scheduler_config.json",
    "classifiers/config.json",
    "classifiers/style.safetensors",
    "classifiers/object.safetensors",
)


class MiniCanvasWeightsError(ValueError):
    """A MiniCanvas weight file is missing, corrupted (checksum mismatch) or does not fit the model."""


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _resolve(weights_dir: str | os.PathLike | None) -> Path:
    return Path(weights_dir) if weights_dir is not None else DEFAULT_WEIGHTS_DIR


def weights_size(weights_dir: str | os.PathLike | None = None) -> int:
    """Total bytes of all files in the weights folder (manifest included)."""
    root = _resolve(weights_dir)
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def read_manifest(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """The parsed manifest (not verified; see :func:`verify_weights`)."""
    path = _resolve(weights_dir) / MANIFEST_NAME
    if not path.is_file():
        raise MiniCanvasWeightsError(f"MiniCanvas weights manifest is missing: {path}")
    try:
        manifest = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise MiniCanvasWeightsError(f"MiniCanvas weights manifest is unreadable: {path} ({exc})") from exc
    if not isinstance(manifest, dict) or not isinstance(manifest.get("files"), dict):
        raise MiniCanvasWeightsError(f"MiniCanvas weights manifest has no 'files' table: {path}")
    return manifest


def verify_weights(weights_dir: str | os.PathLike | None = None) -> dict[str, Any]:
    """Check every file of the MiniCanvas manifest (presence, size, sha256) before anything is loaded from it.

    Args:
        weights_dir: the weights folder (None: the one shipped in the package).

    Returns:
        The manifest (files, training report, measured quality).

    Raises:
        MiniCanvasWeightsError: a required file missing from the manifest, or a file missing, of the wrong size or
            with the wrong sha256, naming the first bad file.
    """
    root = _resolve(weights_dir)
    manifest = read_manifest(root)
    files: dict[str, dict[str, Any]] = manifest["files"]
    for rel in REQUIRED_FILES:
        if rel not in files:
            raise MiniCanvasWeightsError(f"MiniCanvas weights manifest {root / MANIFEST_NAME} does not list the "
                                         f"required file {root / rel}")
    for rel, entry in sorted(files.items()):
        path = root / rel
        if not path.is_file():
            raise MiniCanvasWeightsError(f"MiniCanvas weight file is missing: {path}")
        size = path.stat().st_size
        if size != entry.get("bytes"):
            raise MiniCanvasWeightsError(f"MiniCanvas weight file has the wrong size (checksum mismatch): {path} "
                                         f"is {size} bytes, manifest says {entry.get('bytes')}")
        digest = _sha256(path)
        if digest != entry.get("sha256"):
            raise MiniCanvasWeightsError(f"MiniCanvas weight file is corrupted (sha256 checksum mismatch): {path} "
                                         f"has {digest}, manifest says {entry.get('sha256')}")
    return manifest


def _write_manifest(root: Path, training: dict[str, Any] | None, quality: dict[str, Any] | None) -> None:
    files = {}
    for path in sorted(p for p in root.rglob("*") if p.is_file() and p.name != MANIFEST_NAME):
        rel = path.relative_to(root).as_posix()
        files[rel] = {"bytes": path.stat().st_size, "sha256": _sha256(path)}
    manifest = {"format": MANIFEST_FORMAT, "files": files, "training": training or {}, "quality": quality or {}}
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2, sort_keys=False) + "\n")


def save_weights(out_dir: str | os.PathLike, pipe, classifiers: dict[str, tuple[ConceptClassifierNet, Sequence[str]]],
                 resolution: int, width: int, training: dict[str, Any] | None = None) -> Path:
    """Write pipeline + classifiers + manifest to ``out_dir`` (replacing it; written aside, then moved in)."""
    out = Path(out_dir)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".minicanvas-", dir=out.parent))
    try:
        pipe.save_pretrained(tmp / "pipeline", safe_serialization=True)
        clf_dir = tmp / "classifiers"
        clf_dir.mkdir()
        config: dict[str, Any] = {"resolution": resolution, "width": width}
        for name, (net, labels) in classifiers.items():
            state = {k: v.detach().cpu().contiguous() for k, v in net.state_dict().items()}
            save_file(state, str(clf_dir / f"{name}.safetensors"))
            config[name] = {"labels": list(labels), "file": f"{name}.safetensors"}
        (clf_dir / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        _write_manifest(tmp, training, None)
        # mkdtemp and some writers create private files; shipped weights must be readable by every user.
        for path in [tmp, *tmp.rglob("*")]:
            path.chmod(0o755 if path.is_dir() else 0o644)
        if out.exists():
            shutil.rmtree(out)
        os.replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return out


def record_quality(weights_dir: str | os.PathLike, quality: dict[str, Any]) -> None:
    """Store a measured quality report in the manifest (the manifest itself is not checksummed)."""
    root = _resolve(weights_dir)
    manifest = read_manifest(root)
    manifest["quality"] = quality
    (root / MANIFEST_NAME).write_text(json.dumps(manifest, indent=2) + "\n")


def _load_component(cls, folder: Path, weight_file: str, **kwargs):
    try:
        return cls.from_pretrained(str(folder), local_files_only=True, **kwargs)
    except Exception as exc:  # any failure here means the shipped file does not fit the model
        raise MiniCanvasWeightsError(f"MiniCanvas weight file could not be loaded: {folder / weight_file} "
                                     f"({type(exc).__name__}: {exc})") from exc


def _check_keys(module: torch.nn.Module, path: Path) -> None:
    # transformers re-initialises missing tensors with a warning only; a shipped file must hold exactly the model.
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        stored = set(f.keys())
    expected = set(module.state_dict().keys())
    if stored != expected:
        missing, unexpected = sorted(expected - stored), sorted(stored - expected)
        raise MiniCanvasWeightsError(f"MiniCanvas weight file does not fit the model: {path} (missing tensors "
                                     f"{missing[:5]}, unexpected tensors {unexpected[:5]})")


def load_pipeline_from(weights_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                       torch_dtype: torch.dtype = torch.float32, verify: bool = True):
    """Verified offline load of the MiniCanvas ``StableDiffusionPipeline``."""
    from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextModel, CLIPTokenizer

    root = _resolve(weights_dir)
    if verify:
        verify_weights(root)
    folder = root / "pipeline"
    # Component by component, so that a failure names the file that caused it.
    unet = _load_component(UNet2DConditionModel, folder / "unet", "diffusion_pytorch_model.safetensors",
                           torch_dtype=torch_dtype)
    vae = _load_component(AutoencoderKL, folder / "vae", "diffusion_pytorch_model.safetensors",
                          torch_dtype=torch_dtype)
    text_encoder = _load_component(CLIPTextModel, folder / "text_encoder", "model.safetensors", dtype=torch_dtype)
    tokenizer = _load_component(CLIPTokenizer, folder / "tokenizer", "tokenizer_config.json")
    scheduler = _load_component(DDIMScheduler, folder / "scheduler", "scheduler_config.json")
    _check_keys(unet, folder / "unet" / "diffusion_pytorch_model.safetensors")
    _check_keys(vae, folder / "vae" / "diffusion_pytorch_model.safetensors")
    _check_keys(text_encoder, folder / "text_encoder" / "model.safetensors")
    if text_encoder.get_input_embeddings().num_embeddings != len(tokenizer):
        raise MiniCanvasWeightsError(f"MiniCanvas tokenizer {folder / 'tokenizer'} has {len(tokenizer)} "
                                     f"tokens but the text encoder has "
                                     f"{text_encoder.get_input_embeddings().num_embeddings}")
    if unet.config.cross_attention_dim != text_encoder.config.hidden_size:
        raise MiniCanvasWeightsError(f"MiniCanvas UNet {folder / 'unet' / 'config.json'} expects text features of size "
                                     f"{unet.config.cross_attention_dim}, text encoder gives "
                                     f"{text_encoder.config.hidden_size}")
    pipe = StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    # Record the folder so that save/reload and the model card can refer to it.
    pipe.register_to_config(_name_or_path=str(folder))
    if device is not None:
        pipe.to(device)
    return pipe


def load_classifiers_from(weights_dir: str | os.PathLike | None = None, device: str | torch.device | None = None,
                          verify: bool = True) -> tuple[ConceptClassifier, ConceptClassifier]:
    """Verified load of the ``(style, object)`` classifiers."""
    root = _resolve(weights_dir)
    if verify:
        verify_weights(root)
    folder = root / "classifiers"
    config_path = folder / "config.json"
    try:
        config = json.loads(config_path.read_text())
        resolution, width = int(config["resolution"]), int(config["width"])
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise MiniCanvasWeightsError(f"MiniCanvas classifier config is invalid: {config_path} ({exc})") from exc
    out = []
    for name in ("style", "object"):
        try:
            labels = list(config[name]["labels"])
            path = folder / config[name]["file"]
        except (KeyError, TypeError) as exc:
            raise MiniCanvasWeightsError(f"MiniCanvas classifier config {config_path} has no valid {name!r} "
                                         f"entry") from exc
        net = ConceptClassifierNet(len(labels), width=width)
        try:
            net.load_state_dict(load_file(str(path)), strict=True)
        except Exception as exc:  # missing keys, wrong shapes, unreadable file
            raise MiniCanvasWeightsError(f"MiniCanvas classifier weight file could not be loaded: {path} "
                                         f"({type(exc).__name__}: {exc})") from exc
        clf = ConceptClassifier(net, labels, resolution=resolution, domain=name)
        if device is not None:
            clf.to(device)
        out.append(clf)
    return out[0], out[1]

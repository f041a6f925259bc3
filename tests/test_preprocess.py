"""`repa preprocess` on a small synthetic ImageNet-style folder: the documented files, ADM's
centre crop, our VAE's moments, checksums, skipped files, resuming and several workers."""

import json
import shutil
from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from helpers import BAD, CLASSES, GOOD, RES, SETTINGS
from PIL import Image
from typer.testing import CliRunner

import repa_eqx.data.writer as pre
from repa_cli.main import app
from repa_eqx.data.shards import PreprocessError, read_manifest, verify
from repa_eqx.data.writer import preprocess
from repa_eqx.pretrained.registry import load_vae
from repa_eqx.pretrained.vae import encode


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in out.rglob("*") if p.is_file()}


def _adm_center_crop(image: Image.Image, size: int) -> np.ndarray:
    """guided-diffusion's center_crop_arr on the RGB image, as the reference calls it."""
    pil = Image.fromarray(np.array(image.convert("RGB")))
    while min(*pil.size) >= 2 * size:
        pil = pil.resize(tuple(x // 2 for x in pil.size), resample=Image.BOX)
    scale = size / min(*pil.size)
    pil = pil.resize(tuple(round(x * scale) for x in pil.size), resample=Image.BICUBIC)
    arr = np.array(pil)
    y, x = (arr.shape[0] - size) // 2, (arr.shape[1] - size) // 2
    return arr[y : y + size, x : x + size]


def _expected_inputs(source: Path) -> list[tuple[str, int]]:
    good = [(f"{CLASSES[label]}/{name}", label) for label, name, _, _ in GOOD]
    return sorted(good + [(path, CLASSES.index(path.split("/")[0])) for path in BAD])


def _load(out: Path, name: str) -> np.ndarray:
    shards = read_manifest(out)["shards"]
    return np.concatenate([np.load(out / s["path"] / name, mmap_mode="r") for s in shards])


def test_documented_files_shapes_labels_and_skipped(dataset, source, vae_folder):
    manifest = json.loads((dataset / "manifest.json").read_text())
    assert manifest["format"] == "repa-eqx-latents" and manifest["version"] == 1
    assert manifest["resolution"] == RES and manifest["image_shape"] == [3, RES, RES]
    assert manifest["moments_shape"] == [8, RES // 8, RES // 8]
    assert manifest["latent_scale"] == 0.18215
    assert manifest["classes"] == CLASSES and manifest["num_classes"] == 3
    assert manifest["vae"]["source"] == str(vae_folder)
    assert manifest["vae"]["revision"].startswith("local-")
    assert manifest["shard_size"] == 8 and manifest["num_examples"] == len(GOOD)
    assert {s["path"]: s["error"][:100] for s in manifest["skipped"]}.keys() == BAD.keys()
    for entry in manifest["skipped"]:
        assert BAD[entry["path"]] in entry["error"]

    inputs = _expected_inputs(source)  # 22 files: shards of 8, 8 and 6 inputs
    assert [s["path"] for s in manifest["shards"]] == [f"shards/0000{k}" for k in range(3)]
    for k, shard in enumerate(manifest["shards"]):
        kept = [(p, y) for p, y in inputs[8 * k : 8 * (k + 1)] if p not in BAD]
        folder = dataset / shard["path"]
        names = ["images.npy", "labels.npy", "moments.npy", "shard.json"]
        assert sorted(p.name for p in folder.iterdir()) == names
        images = np.load(folder / "images.npy", mmap_mode="r")
        moments = np.load(folder / "moments.npy", mmap_mode="r")
        labels = np.load(folder / "labels.npy", mmap_mode="r")
        assert shard["count"] == len(kept) == len(images) == len(moments) == len(labels)
        assert images.dtype == np.uint8 and images.shape[1:] == (3, RES, RES)
        assert moments.dtype == np.float32 and moments.shape[1:] == (8, RES // 8, RES // 8)
        assert labels.dtype == np.int32 and labels.tolist() == [y for _, y in kept]
    assert sum(s["count"] for s in manifest["shards"]) == manifest["num_examples"]
    assert not list(dataset.rglob("*.partial")) and not list(dataset.rglob("*.tmp"))


def test_crop_is_adm_and_moments_are_our_vae(dataset, source, vae_folder):
    kept = [p for p, _ in _expected_inputs(source) if p not in BAD]
    images, moments = _load(dataset, "images.npy"), _load(dataset, "moments.npy")
    vae = load_vae(str(vae_folder))
    for name in ("b_300x200.JPEG", "a_37x53.jpg", "e_palette.png", "d_rgba.png", "b.jpg"):
        index = next(i for i, p in enumerate(kept) if p.endswith("/" + name))
        with Image.open(source / kept[index]) as image:
            crop = _adm_center_crop(image, RES)
        np.testing.assert_array_equal(images[index], crop.transpose(2, 0, 1))
        x = jnp.asarray(crop.transpose(2, 0, 1)[None], jnp.float32) / 127.5 - 1
        mean, std = encode(vae, x)
        np.testing.assert_allclose(moments[index, :4], np.asarray(mean[0]), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(moments[index, 4:], np.asarray(std[0]), rtol=1e-5, atol=1e-5)
    assert (moments[:, 4:] > 0).all() and moments[:, :4].std() > 0.01


def test_checksums_verify_and_a_change_is_named(dataset, tmp_path):
    assert verify(dataset)["num_examples"] == len(GOOD)
    copy = tmp_path / "copy"
    shutil.copytree(dataset, copy)
    moments = np.load(copy / "shards/00001/moments.npy")
    moments[0, 0, 0, 0] += 1e-3
    np.save(copy / "shards/00001/moments.npy", moments)
    (copy / "shards/00002/labels.npy").unlink()
    with pytest.raises(PreprocessError) as error:
        verify(copy)
    message = str(error.value)
    assert "shards/00001/moments.npy (checksum mismatch)" in message
    assert "shards/00002/labels.npy (missing)" in message
    assert "images.npy" not in message


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda m: m.update(format="other"), "format 'other', expected 'repa-eqx-latents'"),
        (lambda m: m.update(version=2), "version 2; this repa-eqx reads version 1"),
        (lambda m: m.pop("shards"), "lacks shards"),
        (lambda m: m.update(num_examples=3), "the shards hold 20 examples, num_examples says 3"),
    ],
)
def test_read_manifest_names_the_problem(dataset, tmp_path, change, message):
    manifest = json.loads((dataset / "manifest.json").read_text())
    change(manifest)
    (tmp_path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PreprocessError, match=message):
        read_manifest(tmp_path)


def test_unfinished_output_has_no_manifest(tmp_path):
    with pytest.raises(PreprocessError, match="not a preprocessed dataset"):
        read_manifest(tmp_path)
    (tmp_path / "preprocess.json").write_text("{}")
    with pytest.raises(PreprocessError, match="is not finished"):
        read_manifest(tmp_path)


def test_resumed_after_interruption_is_byte_identical(
    dataset, source, vae_folder, tmp_path, monkeypatch
):
    out = tmp_path / "out"
    calls = []
    real = pre.encode_uint8

    def interrupted(*args):
        calls.append(1)
        if len(calls) == 4:  # the second batch of the second shard
            raise KeyboardInterrupt
        return real(*args)

    monkeypatch.setattr(pre, "encode_uint8", interrupted)
    with pytest.raises(KeyboardInterrupt):
        preprocess(source, out, vae=str(vae_folder), **SETTINGS)
    assert (out / "shards/00000/shard.json").is_file()
    assert (out / "shards/00001.partial").is_dir() and not (out / "shards/00001").exists()
    assert not (out / "manifest.json").exists()
    first = (out / "shards/00000/images.npy").stat().st_mtime_ns

    monkeypatch.setattr(pre, "encode_uint8", real)
    result = preprocess(source, out, vae=str(vae_folder), **SETTINGS)
    assert result.shards_written == 2 and result.manifest is not None
    assert (out / "shards/00000/images.npy").stat().st_mtime_ns == first  # never rewritten
    assert _files(out) == _files(dataset)
    again = preprocess(source, out, vae=str(vae_folder), **SETTINGS)  # nothing left to do
    assert again.shards_written == 0 and _files(out) == _files(dataset)


def test_two_workers_give_the_same_dataset(dataset, source, vae_folder, tmp_path):
    out = tmp_path / "out"
    second = preprocess(source, out, vae=str(vae_folder), num_workers=2, worker_index=1, **SETTINGS)
    assert second.manifest is None and second.shards_written == 1 and second.shards_complete == 1
    assert sorted(p.name for p in (out / "shards").iterdir()) == ["00001"]
    with pytest.raises(PreprocessError, match=r"2 of 3 shards are not done yet \(00000, 00002\)"):
        pre.finalize(out)
    first = preprocess(source, out, vae=str(vae_folder), num_workers=2, worker_index=0, **SETTINGS)
    assert first.shards_written == 2 and first.manifest == read_manifest(out)
    assert _files(out) == _files(dataset)


def test_other_settings_in_the_same_folder_are_refused(dataset, source, vae_folder, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(dataset, out)
    with pytest.raises(PreprocessError, match=r"other settings \(image_shape, moments_shape"):
        preprocess(source, out, vae=str(vae_folder), **(SETTINGS | {"resolution": 64}))
    with pytest.raises(PreprocessError, match="worker index 2 is not in"):
        preprocess(source, out, vae=str(vae_folder), num_workers=2, worker_index=2)
    with pytest.raises(PreprocessError, match="resolution 36 is not a positive multiple of 8"):
        preprocess(source, out, vae=str(vae_folder), resolution=36)


def test_corrupt_folder_is_counted_not_a_crash(vae_folder, tmp_path):
    root = tmp_path / "corrupt"
    rng = np.random.default_rng(1)
    for name in ("a/x.jpg", "a/y.png", "b/z.JPEG"):
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_bytes(rng.integers(0, 256, 500, np.uint8).tobytes())
    (root / "b/empty.png").write_bytes(b"")
    result = preprocess(root, tmp_path / "out", vae=str(vae_folder), **SETTINGS)
    assert result.examples_written == 0 and len(result.skipped) == 4
    manifest = verify(tmp_path / "out")
    assert manifest["num_examples"] == 0 and len(manifest["skipped"]) == 4
    assert np.load(tmp_path / "out/shards/00000/images.npy").shape == (0, 3, RES, RES)
    assert np.load(tmp_path / "out/shards/00000/moments.npy").shape == (0, 8, RES // 8, RES // 8)


def test_list_file(source, vae_folder, tmp_path):
    listed = tmp_path / "train.txt"
    lines = ["# path label", f"{CLASSES[2]}/b.jpg 7", "", f"{CLASSES[0]}/a_37x53.jpg 1"]
    listed.write_text("\n".join(lines + [f"{CLASSES[1]}/bad.jpg 0"]) + "\n")
    result = preprocess(source, tmp_path / "out", vae=str(vae_folder), list_file=listed, **SETTINGS)
    manifest = result.manifest
    assert manifest["classes"] == [str(i) for i in range(8)] and manifest["num_examples"] == 2
    assert np.load(tmp_path / "out/shards/00000/labels.npy").tolist() == [1, 7]  # sorted paths
    assert [s["path"] for s in manifest["skipped"]] == [f"{CLASSES[1]}/bad.jpg"]
    listed.write_text("only_a_path.jpg\n")
    with pytest.raises(PreprocessError, match="train.txt:1: expected 'relative/path label_index'"):
        preprocess(source, tmp_path / "other", vae=str(vae_folder), list_file=listed)


def test_cli_end_to_end_and_bad_source(dataset, source, vae_folder, tmp_path):
    runner = CliRunner()
    out = tmp_path / "out"
    args = ["preprocess", str(source), str(out), "--vae", str(vae_folder), "--resolution", "32"]
    args += ["--batch", "4", "--shard-size", "8", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    assert f"done: {len(GOOD)} images of 3 classes in 3 shards" in result.output
    assert "latent statistics per channel: mean [" in result.output
    assert "skipped 2 unreadable file(s): n01443537/bad.jpg (cannot identify image file)" in (
        result.output
    )
    assert _files(out) == _files(dataset)

    result = runner.invoke(app, ["preprocess", str(tmp_path / "nowhere"), str(tmp_path / "o")])
    assert result.exit_code == 1
    assert result.output.strip().splitlines() == [f"error: {tmp_path / 'nowhere'} is not a folder"]
    result = runner.invoke(app, ["preprocess", str(source), str(tmp_path / "o"), "--finalize"])
    assert result.exit_code == 1 and "holds no preprocess.json" in result.output

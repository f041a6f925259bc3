"""Sampling many images: determinism across batch sizes and devices, labels, the files written,
and `repa sample` on a real (tiny) training run."""

import os
import subprocess
import sys
import textwrap

import equinox as eqx
import jax
import numpy as np
import pytest
from PIL import Image
from typer.testing import CliRunner

from repa_cli.main import app
from repa_eqx.model.sit import SiT, SiTConfig
from repa_eqx.runs.load import RunNotFound, latest_run, load_run
from repa_eqx.sampling.samples import SamplerSpec, choose_labels, generate, sample

pytestmark = pytest.mark.standard_promotion

runner = CliRunner()


def random_sit(seed=0):
    config = SiTConfig(
        input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=2, num_heads=2,
        num_classes=10, encoder_depth=1,
    )  # fmt: skip
    sit = SiT(config, key=jax.random.key(seed))
    # Perturb every weight (the zero-initialised output layers too) so samples depend on them.
    leaves, treedef = jax.tree.flatten(sit)
    keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
    return jax.tree.unflatten(
        treedef,
        [
            x + 0.1 * jax.random.normal(k, x.shape) if eqx.is_inexact_array(x) else x
            for x, k in zip(leaves, keys, strict=True)
        ],
    )


@pytest.mark.parametrize(
    "spec",
    [
        SamplerSpec("ode", 6, cfg_scale=2.0, interval=(0.0, 0.7)),
        SamplerSpec("sde", 6, cfg_scale=1.5),
    ],
    ids=["ode", "sde"],
)
def test_same_seed_same_images_whatever_the_batch_size(spec):
    sit = random_sit()
    labels = choose_labels(7, 10, seed=3)
    runs = [
        generate(sit, spec, num=7, labels=labels, seed=3, batch_size=b, progress=False).images
        for b in (7, 3, 16)
    ]
    assert runs[0].shape == (7, 8, 8, 3) and runs[0].dtype == np.uint8
    for other in runs[1:]:
        # Different batch shapes may round the last float bit differently: allow 1 level.
        assert np.abs(runs[0].astype(int) - other.astype(int)).max() <= 1
    other_seed = generate(sit, spec, num=7, labels=labels, seed=4, progress=False).images
    assert np.abs(runs[0].astype(int) - other_seed.astype(int)).mean() > 5


@pytest.mark.slow  # about 20 s on 2 loaded cores: three sampler compilations
def test_bf16_model_integrates_in_the_states_float32():
    """A bf16 SiT samples a float32 state in float32 (its velocities cast up), close to the
    float32 model's samples."""
    import jax.numpy as jnp

    from repa_eqx.sampling.samples import example_inputs, sample_jit

    sit = random_sit()
    bf16 = jax.tree.map(lambda a: a.astype(jnp.bfloat16) if eqx.is_inexact_array(a) else a, sit)
    noise, keys = example_inputs(0, jnp.arange(3), (1, 8, 8))
    labels = jnp.array([1, 2, 3], jnp.int32)
    spec = SamplerSpec("ode", 4, cfg_scale=1.8, interval=(0.0, 0.7))
    exact = sample_jit(sit, spec, noise, labels, keys)
    low = sample_jit(bf16, spec, noise, labels, keys)
    assert low.dtype == jnp.float32
    assert 0 < float(jnp.abs(low - exact).max()) < 0.1 < float(jnp.abs(exact - noise).mean())
    # The SDE's last step too (outside its loops): float32 out.
    assert sample_jit(bf16, SamplerSpec("sde", 3), noise, labels, keys).dtype == jnp.float32


def test_generate_compiles_once_for_every_batch(caplog):
    """Once one batch shape is compiled, more batches of it, and a short last batch (padded),
    compile no sampler again: it is not retraced per batch."""
    sit = random_sit(seed=5)
    spec = SamplerSpec("ode", 3, cfg_scale=1.5, interval=(0.0, 0.5))

    def sampler_compiles(num: int) -> list[str]:
        caplog.clear()
        with jax.log_compiles(True), caplog.at_level("WARNING"):
            generate(
                sit, spec, num=num, labels=choose_labels(num, 10), batch_size=3, progress=False
            )
        return [r.getMessage() for r in caplog.records if "jit(sample)" in r.getMessage()]

    assert sampler_compiles(3)  # the first batch of 3 compiles it: the log is seen
    assert sampler_compiles(9) == []  # three full batches
    assert sampler_compiles(8) == []  # two full and one of 2, padded to 3


def test_labels():
    balanced = choose_labels(30, 10, balanced=True)
    assert np.bincount(balanced, minlength=10).tolist() == [3] * 10
    assert choose_labels(5, 10, classes=[7, 2]).tolist() == [7, 2, 7, 2, 7]
    random = choose_labels(2000, 10, seed=1)
    assert (random == choose_labels(2000, 10, seed=1)).all()
    assert (random != choose_labels(2000, 10, seed=2)).any()
    assert np.bincount(random, minlength=10).min() > 150
    # Example i's label does not depend on how many are drawn.
    assert (choose_labels(50, 10, seed=1) == random[:50]).all()
    with pytest.raises(ValueError, match="classes must lie"):
        choose_labels(5, 10, classes=[10])


def test_files_written(tmp_path):
    sit = random_sit()
    labels = choose_labels(10, 10, balanced=True)
    out = tmp_path / "samples" / "run1"
    result = generate(
        sit, SamplerSpec("ode", 3), num=10, labels=labels, batch_size=4, out=out, progress=False
    )
    pngs = sorted(out.glob("[0-9]*.png"))
    assert [p.name for p in pngs] == [f"{i:06d}.png" for i in range(10)]
    assert np.array_equal(np.asarray(Image.open(pngs[4])), result.images[4])
    assert (out / "grid.png").is_file()
    with np.load(tmp_path / "samples" / "run1.npz") as npz:
        assert npz["arr_0"].shape == (10, 8, 8, 3) and npz["arr_0"].dtype == np.uint8
        assert npz["labels"].tolist() == labels.tolist()
        assert np.array_equal(npz["arr_0"], result.images)


@pytest.mark.slow
def test_sampling_sharded_over_devices_matches_one_device(tmp_path):
    """Four forced host devices (a fresh process: the device count is fixed at start-up)."""
    script = textwrap.dedent(
        """
        import jax, numpy as np
        import sys; sys.path.insert(0, {tests!r})
        from test_generate import random_sit
        from repa_eqx.sampling.samples import SamplerSpec, choose_labels, generate
        assert len(jax.devices()) == 4
        sit = random_sit()
        labels = choose_labels(10, 10, seed=0)
        spec = SamplerSpec("sde", 5, cfg_scale=2.0, interval=(0.0, 0.7))
        one = generate(sit, spec, num=10, labels=labels, batch_size=4,
                       devices=jax.devices()[:1], progress=False).images
        four = generate(sit, spec, num=10, labels=labels, batch_size=6, progress=False).images
        print("max diff", np.abs(one.astype(int) - four.astype(int)).max())
        assert np.abs(one.astype(int) - four.astype(int)).max() <= 1
        """
    ).format(tests=os.path.dirname(__file__))
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=4")
    done = subprocess.run(
        [sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_sample_is_the_sampler_over_the_sit_velocity():
    sit = random_sit()
    noise = jax.random.normal(jax.random.key(0), (3, 1, 8, 8))
    labels = jax.numpy.array([1, 2, 3])
    keys = jax.random.split(jax.random.key(1), 3)
    # One Euler step from t = 1 to 0: x0 = x1 - v(x1, 1, y).
    x0 = sample(sit, SamplerSpec("ode", 1), noise, labels, keys)
    v = jax.vmap(lambda x, y: sit(x, jax.numpy.ones(()), y)[0])(noise, labels)
    np.testing.assert_allclose(x0, noise - v, rtol=1e-5, atol=1e-5)


def test_load_run_restores_the_ema_weights(trained_run):
    from repa_eqx.training.checkpoint import Checkpointer

    run = trained_run
    model = load_run(run)
    assert model.step == 4 and model.path == "linear" and not model.latent
    flat, _ = Checkpointer(run / "checkpoints").restore_flat(4)
    np.testing.assert_array_equal(model.sit.label_table, flat["ema/sit/label_table"])
    assert not np.array_equal(model.sit.label_table, flat["model/sit/label_table"])
    assert load_run(run / "checkpoints" / "2").step == 2
    assert latest_run(trained_run.parent) == run
    with pytest.raises(RunNotFound, match="no checkpoint at step 3"):
        load_run(run, step=3)
    with pytest.raises(RunNotFound, match="no run with checkpoints"):
        latest_run(trained_run.parent / "nowhere")


def test_sample_command(trained_run, tmp_path, monkeypatch):
    monkeypatch.chdir(trained_run.parent.parent)
    args = ["sample", "--runs-dir", str(trained_run.parent), "--num", "6", "--batch", "4"]
    args += ["--steps", "3", "--cfg", "1.8", "--interval", "0,0.7", "--no-progress"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    folder = trained_run / "samples" / "ode-euler-3-cfg1.8-0_0.7-seed0-n6"
    assert (folder / "grid.png").is_file() and len(list(folder.glob("0*.png"))) == 6
    with np.load(folder.with_name(folder.name + ".npz")) as npz:
        assert npz["arr_0"].shape == (6, 32, 32, 3)
    sde = runner.invoke(
        app,
        ["sample", "--ckpt", str(trained_run), "--mode", "sde", "--steps", "3",
         "--num", "3", "--class-balanced", "--out", str(tmp_path / "s"), "--no-png",
         "--no-progress"],
    )  # fmt: skip
    assert sde.exit_code == 0, sde.output
    assert not list((tmp_path / "s").glob("0*.png"))
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["labels"].tolist() == [0, 1, 2]


def test_sample_command_in_bf16(trained_run, tmp_path):
    """`--precision bf16`: bf16 weights, float32 state; the samples are close to the fp32 ones
    (not equal), the folder and the card say bf16."""
    import json

    common = ["sample", "--ckpt", str(trained_run), "--num", "4", "--steps", "3", "--cfg", "1.8"]
    common += ["--interval", "0,0.7", "--no-png", "--no-progress"]
    fp32 = runner.invoke(app, [*common, "--out", str(tmp_path / "fp32")])
    assert fp32.exit_code == 0, fp32.output
    bf16 = runner.invoke(app, [*common, "--precision", "bf16"])
    assert bf16.exit_code == 0, bf16.output
    npz = trained_run / "samples" / "ode-euler-3-cfg1.8-0_0.7-seed0-n4-bf16.npz"
    with np.load(tmp_path / "fp32.npz") as a, np.load(npz) as b:
        diff = np.abs(a["arr_0"].astype(int) - b["arr_0"].astype(int))
        card = json.loads(str(b["card"]))
    assert 0 < diff.mean() < 4 and diff.max() <= 64, (diff.mean(), diff.max())
    assert card["precision"] == "bf16"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--ckpt", "nowhere"], "nowhere is not a run directory"),
        (["--cfg", "0.5"], "cfg_scale must be >= 1"),
        (["--interval", "0.9,0.1"], "guidance interval must satisfy"),
        (["--mode", "langevin"], "mode must be 'ode' or 'sde'"),
        (["--precision", "fp16"], "precision must be one of fp32, bf16"),
    ],
)
@pytest.mark.unchecked
def test_sample_command_errors_are_one_line(trained_run, args, message):
    result = runner.invoke(
        app, ["sample", "--runs-dir", str(trained_run.parent), "--no-progress", "--num", "2", *args]
    )
    assert result.exit_code == 1, result.output
    assert message in result.output and "Traceback" not in result.output
    assert len(result.output.strip().splitlines()) == 1, result.output


def test_sample_command_on_an_official_checkpoint_decodes_with_the_vae(tmp_path):
    diffusers = pytest.importorskip("diffusers")
    pytest.importorskip("torch")
    from repa_eqx.model.repa import REPAModel
    from repa_eqx.pretrained.official import export_official, official_config

    blocks = dict(
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2
    )
    vae = diffusers.AutoencoderKL(
        block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, **blocks
    )
    vae.save_pretrained(tmp_path / "vae")
    args = dict(
        model="SiT-S/2", depth=2, hidden_size=32, num_heads=2, resolution=64, num_classes=10,
        encoder_depth=1, projector_dim=16, projector_embed_dims="24",
    )  # fmt: skip
    config, z_dims, projector_dim = official_config(args)
    model = REPAModel(config, z_dims, projector_dim, key=jax.random.key(0))
    files = export_official(model, tmp_path / "repa", args=args)
    checkpoint = next(f for f in files if f.suffix == ".pt")
    result = runner.invoke(
        app,
        ["sample", "--ckpt", str(checkpoint), "--vae", str(tmp_path / "vae"), "--num", "3",
         "--steps", "2", "--cfg", "1.5", "--out", str(tmp_path / "s"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as npz:
        # 8x8 latents, two VAE blocks: one 2x upsampling.
        assert npz["arr_0"].shape == (3, 16, 16, 3) and npz["arr_0"].dtype == np.uint8


def test_sample_command_from_an_export(trained_run, tmp_path):
    from repa_eqx.runs.export import export_run

    folder = export_run(trained_run, tmp_path / "export")
    result = runner.invoke(
        app,
        ["sample", "--from-hub", str(folder), "--num", "2", "--steps", "2",
         "--out", str(tmp_path / "s"), "--no-progress"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    with np.load(tmp_path / "s.npz") as npz:
        assert npz["arr_0"].shape == (2, 32, 32, 3)

import dataclasses
from pathlib import Path

import pytest

from repa_eqx.training.recipe import Recipe, RecipeError, dump_recipe, load_recipe, parse_recipe

pytestmark = pytest.mark.standard_promotion

RECIPES = sorted(Path(__file__).parent.parent.joinpath("recipes").glob("*.toml"))


@pytest.mark.parametrize("path", RECIPES, ids=[p.stem for p in RECIPES])
def test_shipped_recipes_parse_and_round_trip(path, tmp_path):
    recipe = load_recipe(path)
    saved = tmp_path / "r.toml"
    saved.write_text(dump_recipe(recipe))
    assert load_recipe(saved) == recipe


def test_paper_recipes_carry_the_paper_settings():
    for size, depth in (("b", 4), ("l", 8), ("xl", 8)):
        r = load_recipe(Path(__file__).parent.parent / f"recipes/sit_{size}_repa.toml")
        assert r.model.encoder_depth == depth and r.model.projector_dim == 2048
        assert (r.optim.lr, r.optim.beta1, r.optim.beta2, r.optim.eps) == (1e-4, 0.9, 0.999, 1e-8)
        assert (r.optim.weight_decay, r.optim.max_grad_norm, r.optim.ema_decay) == (0, 1.0, 0.9999)
        assert (r.data.batch_size, r.train.steps, r.loss.proj_coeff) == (256, 400_000, 0.5)
        assert r.encoders[0].id == "facebook/dinov2-base" and r.encoders[0].resolution == 224


def test_vanilla_twins_differ_only_by_repa():
    """Each sit_*.toml baseline is its REPA twin without encoders (and at 512 px, the 512
    twin uses 64x64 latents and DINOv2 at 448 px: 32x32 patches, the SiT-XL/2 grid)."""
    root = Path(__file__).parent.parent / "recipes"
    for vanilla_name, repa_name in (
        ("sit_b", "sit_b_repa"),
        ("sit_l", "sit_l_repa"),
        ("sit_xl", "sit_xl_repa"),
        ("sit_xl_512", "sit_xl_repa_512"),
    ):
        repa = load_recipe(root / f"{repa_name}.toml")
        vanilla = load_recipe(root / f"{vanilla_name}.toml")
        assert vanilla.encoders == () and vanilla.loss.proj_coeff == 0
        assert (
            dataclasses.replace(vanilla, encoders=repa.encoders, loss=repa.loss, output=repa.output)
            == repa
        )
    big = load_recipe(root / "sit_xl_repa_512.toml")
    assert big.model.input_size == 64 and big.encoders[0].resolution == 448
    assert big.model.input_size // 2 == big.encoders[0].resolution // 14


@pytest.mark.parametrize(
    "table, message",
    [
        (
            {"model": {"dept": 3}},
            "recipe key 'model.dept' is unknown (did you mean 'model.depth'?)",
        ),
        ({"modle": {}}, "recipe key 'modle' is unknown (did you mean 'model'?)"),
        ({"optim": {"lr": "fast"}}, "recipe key 'optim.lr' must be float, got str 'fast'"),
        ({"train": {"steps": 1.5}}, "recipe key 'train.steps' must be int"),
        ({"train": {"steps": True}}, "recipe key 'train.steps' must be int"),
        (
            {"train": {"precision": "fp16"}},
            "recipe key 'train.precision' must be 'fp32' or 'bf16' or 'auto'",
        ),
        (
            {"train": {"remat": "some"}},
            "recipe key 'train.remat' must be 'none' or 'dots' or 'full'",
        ),
        ({"encoders": [{"id": "x", "res": 1}]}, "recipe key 'encoders[0].res' is unknown"),
        ({"encoders": {"id": "x"}}, "recipe key 'encoders' must be a list"),
        ({"train": {"steps": 0}}, "recipe key 'train.steps' must be positive"),
        ({"data": {"dataset": "imagenet-latents"}}, "recipe key 'data.path' is required"),
    ],
)
def test_errors_name_the_key(table, message):
    table = {"data": {"dataset": "mnist-5k"}} | table
    with pytest.raises(RecipeError) as e:
        parse_recipe(table)
    assert message in str(e.value)
    assert "\n" not in str(e.value)


def test_set_overrides():
    r = parse_recipe(
        {"data": {"dataset": "mnist-5k"}, "encoders": [{"id": "a"}]},
        [
            "optim.lr=3e-4",
            "output.dir=runs/x",
            'train.precision="bf16"',
            "encoders[0].resolution=112",
        ],
    )
    assert r.optim.lr == 3e-4 and r.output.dir == "runs/x" and r.train.precision == "bf16"
    assert r.encoders[0].resolution == 112
    with pytest.raises(RecipeError, match="recipe key 'optim.lrr' is unknown"):
        parse_recipe({"data": {"dataset": "mnist-5k"}}, ["optim.lrr=1"])
    with pytest.raises(RecipeError, match="KEY=VALUE"):
        parse_recipe({}, ["optim.lr"])


def test_defaults_are_the_paper_constants():
    r = Recipe()
    assert r.loss.proj_coeff == 0.5 and r.model.class_dropout_prob == 0.1
    assert r.loss.path == "linear" and r.loss.weighting == "uniform"


def test_missing_file_and_bad_toml(tmp_path):
    with pytest.raises(RecipeError, match="recipe file not found"):
        load_recipe(tmp_path / "nope.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[model\narch = 1")
    with pytest.raises(RecipeError, match="invalid TOML"):
        load_recipe(bad)

"""Training: the recipe (a TOML file mapped onto a typed schema, the whole truth of a run),
the objective, the jitted step, the loop, orbax checkpoints, the device mesh and metrics logs.
`train(recipe)` runs it all."""

from .loop import train as train
from .precision import resolve_precision as resolve_precision
from .recipe import Recipe as Recipe
from .recipe import RecipeError as RecipeError
from .recipe import load_recipe as load_recipe

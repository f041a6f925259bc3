"""Runs as a whole: finding a run and loading its EMA model (or a checkpoint file's, or an
export's), sampling it as `repa sample` does, and publishing it as a self-contained folder on
the Hugging Face Hub."""

from .export import export_run as export_run
from .export import from_pretrained as from_pretrained
from .sample import find_model as find_model
from .sample import sample_model as sample_model

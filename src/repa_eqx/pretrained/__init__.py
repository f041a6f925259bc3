"""Pretrained networks ported to Equinox, read from their Hub files without torch.

Every port has one contract (`_convert.Port` for the Hub-layout ones: config from a dict,
converter targets, `from_state_dict`, load from a folder), and `registry.py` resolves every
name, the offline teacher included, reading the conversion cache (`repa convert`) when it
holds the source. Private modules hold what the ports share: the converter (`_convert`), the
Hub download helper (`_hub`), the ViT kit (`_vit`), the torch-free pickle reader
(`_torch_pickle`) and the conversion cache (`_cache`); other rooms use this namespace.
`ldm_vae` reads the VAEs published as latent-diffusion `.pt` files (VA-VAE, REPA-E's) into
the diffusers `AutoencoderKL` port.
"""

from ._convert import WeightsMismatch as WeightsMismatch
from ._hub import PretrainedNotFound as PretrainedNotFound
from ._hub import download as download
from ._torch_pickle import UnreadableCheckpoint as UnreadableCheckpoint
from ._torch_pickle import UnsafeCheckpoint as UnsafeCheckpoint
from .clip import ClipVision as ClipVision
from .clip import ClipVisionConfig as ClipVisionConfig
from .dinov2 import Dinov2 as Dinov2
from .dinov2 import Dinov2Config as Dinov2Config
from .inception import InceptionV3 as InceptionV3
from .inception import load_inception as load_inception
from .lightningdit import load_lightningdit as load_lightningdit
from .mae import Mae as Mae
from .mae import MaeConfig as MaeConfig
from .official import export_official as export_official
from .official import load_official as load_official
from .registry import convert as convert
from .registry import load_clip_vision as load_clip_vision
from .registry import load_converted as load_converted
from .registry import load_dinov2 as load_dinov2
from .registry import load_mae as load_mae
from .registry import load_vae as load_vae
from .vae import AutoencoderKL as AutoencoderKL
from .vae import VAEConfig as VAEConfig

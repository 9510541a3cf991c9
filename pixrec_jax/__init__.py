"""pixrec_jax: PixRec multimodal sequential recommendation in JAX/Flax NNX."""

from pixrec_jax.convert.hf import from_pretrained
from pixrec_jax.models.backbone import Backbone, BackboneOutput
from pixrec_jax.models.config import BackboneConfig, Runtime

__all__ = ["from_pretrained", "Backbone", "BackboneOutput", "BackboneConfig", "Runtime"]

"""The tokenizer and image processing of a local Hugging Face checkpoint directory.

The tokenizer loads with AutoTokenizer (a generic fast tokenizer with its own class,
which is what AutoTokenizer would return), the image settings with AutoProcessor
(its image processor's settings and the processor's image tokens per tile), both
without trust_remote_code: only code shipped with transformers runs. Two processor
families are read:
  Idefics3Processor (SmolVLM)  Idefics3 image processor, `image_seq_len`
  PaliGemmaProcessor           SigLIP image processor, `image_seq_length` (which
                               it takes from the image processor's settings)
The pixels themselves are made by pixrec_jax.data.images, which reproduces both
image processors, and the prompt tokens by pixrec_jax.data.examples.
"""

from __future__ import annotations

import json
import os
import pathlib

import transformers

from pixrec_jax.data import examples
from pixrec_jax.data.images import ImageSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Hub checkpoints keep the image settings in preprocessor_config.json, and SmolVLM-256M-Instruct its
# image_seq_len in processor_config.json; transformers 5 saves all of them in processor_config.json.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")
# Per processor class: the attribute with its image tokens per tile, and the image processor
# (ImageSpec.processor) it must hold.
PROCESSORS = {"Idefics3Processor": ("image_seq_len", "idefics3"), "PaliGemmaProcessor": ("image_seq_length", "siglip")}


def _directory(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory: expected a local Hugging Face checkpoint directory")
  return path


# tokenizer_config.json classes that are the generic fast tokenizer itself (transformers 5 names it
# TokenizersBackend; PreTrainedTokenizerFast is its older name and an alias).
_PLAIN_FAST_TOKENIZERS = ("TokenizersBackend", "PreTrainedTokenizerFast")


def load_tokenizer(path: str | os.PathLike):
  """The tokenizer AutoTokenizer gives for a local directory, or an error that names what is missing."""
  path = _directory(path)
  if not any((path / name).is_file() for name in TOKENIZER_FILES):
    raise FileNotFoundError(f"{path} has no tokenizer (none of {list(TOKENIZER_FILES)}); save one there with "
                            "tokenizer.save_pretrained, or download the checkpoint with its tokenizer files")
  config = path / "tokenizer_config.json"
  kind = None
  if config.is_file():
    try:
      kind = json.loads(config.read_text()).get("tokenizer_class")
    except (json.JSONDecodeError, AttributeError) as e:
      raise ValueError(f"{config}: not a JSON object of tokenizer settings ({e})") from e
  if kind in _PLAIN_FAST_TOKENIZERS:
    # The class AutoTokenizer would pick, without importing its registry of every model (and PyTorch
    # with it, where installed): about 3.5 s off each start of the main job on the demo's tokenizer.
    return transformers.PreTrainedTokenizerFast.from_pretrained(str(path))
  return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def load_image_spec(path: str | os.PathLike, *, max_tiles: int = 0) -> tuple[ImageSpec, int]:
  """(image settings, image tokens per tile) of the checkpoint's Idefics3 or PaliGemma processor."""
  path = _directory(path)
  if not any((path / name).is_file() for name in PROCESSOR_FILES):
    raise FileNotFoundError(f"{path} has no image processor (none of {list(PROCESSOR_FILES)}): an image model needs "
                            "its processor saved beside it (processor.save_pretrained), or set pixrec.text_only=True")
  processor = transformers.AutoProcessor.from_pretrained(str(path), trust_remote_code=False)
  kind = type(processor).__name__
  seq_attr, image_processor_kind = PROCESSORS.get(kind, (None, None))
  image_processor = getattr(processor, "image_processor", None)
  image_seq_len = getattr(processor, seq_attr, None) if seq_attr else None
  if image_processor is None or image_seq_len is None:
    raise ValueError(f"{path}: AutoProcessor gave a {kind}, not one of {list(PROCESSORS)} with an image processor "
                     f"and its image tokens per tile (processor_config.json or preprocessor_config.json)")
  spec = ImageSpec.from_hf_dict(image_processor.to_dict(), max_tiles=max_tiles, source=f"{path}: image processor")
  if spec.processor != image_processor_kind:
    raise ValueError(f"{path}: the {kind} holds a {type(image_processor).__name__}, but its prompt layout goes "
                     f"with the {image_processor_kind} image processor")
  return spec, int(image_seq_len)


def default_image_spec(model_type: str, size: int) -> ImageSpec:
  """A randomly initialised tower's image settings: its family's processor defaults, one tile."""
  return ImageSpec.default(size, examples.STYLES[examples.prompt_style(model_type)])


def image_spec_for(path: str | os.PathLike, *, tile_size: int, image_seq_len: int, max_tiles: int = 0) -> ImageSpec:
  """The checkpoint's image settings, checked against the vision tower it feeds."""
  spec, processor_seq_len = load_image_spec(path, max_tiles=max_tiles)
  if spec.size != tile_size:
    raise ValueError(f"{path}: the image processor makes {spec.size} px tiles but the vision tower "
                     f"reads {tile_size} px images")
  if processor_seq_len != image_seq_len:
    raise ValueError(f"{path}: the processor puts {processor_seq_len} <image> tokens per tile but "
                     f"the model makes {image_seq_len} features per tile")
  return spec

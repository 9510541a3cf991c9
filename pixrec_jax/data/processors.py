"""The tokenizer and image processing of a local Hugging Face checkpoint directory.

The tokenizer loads with AutoTokenizer, the image settings with AutoProcessor
(its image processor's preprocessor_config.json and the processor's
image_seq_len), both without trust_remote_code: only code shipped with
transformers runs. The pixels themselves are made by pixrec_jax.data.images,
which reproduces the Idefics3 image processor.
"""

from __future__ import annotations

import os
import pathlib

import transformers

from pixrec_jax.data.images import ImageSpec

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")
# Hub checkpoints (e.g. SmolVLM-256M-Instruct) keep the image settings in preprocessor_config.json
# and image_seq_len in processor_config.json; transformers 5 saves both in processor_config.json.
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


def _directory(path: str | os.PathLike) -> pathlib.Path:
  path = pathlib.Path(path)
  if not path.is_dir():
    raise FileNotFoundError(f"{path} is not a directory: expected a local Hugging Face checkpoint directory")
  return path


def load_tokenizer(path: str | os.PathLike):
  """AutoTokenizer from a local directory, or an error that names what is missing."""
  path = _directory(path)
  if not any((path / name).is_file() for name in TOKENIZER_FILES):
    raise FileNotFoundError(f"{path} has no tokenizer (none of {list(TOKENIZER_FILES)}); save one there with "
                            "tokenizer.save_pretrained, or download the checkpoint with its tokenizer files")
  return transformers.AutoTokenizer.from_pretrained(str(path), trust_remote_code=False)


def load_image_spec(path: str | os.PathLike, *, max_tiles: int = 0) -> tuple[ImageSpec, int]:
  """(image settings, image tokens per tile) of the checkpoint's Idefics3 processor."""
  path = _directory(path)
  if not any((path / name).is_file() for name in PROCESSOR_FILES):
    raise FileNotFoundError(f"{path} has no image processor (none of {list(PROCESSOR_FILES)}): an image model needs "
                            "its processor saved beside it (processor.save_pretrained), or set pixrec.text_only=True")
  processor = transformers.AutoProcessor.from_pretrained(str(path), trust_remote_code=False)
  image_processor = getattr(processor, "image_processor", None)
  image_seq_len = getattr(processor, "image_seq_len", None)
  if image_processor is None or image_seq_len is None:
    raise ValueError(f"{path}: AutoProcessor gave a {type(processor).__name__}, not an Idefics3Processor with an "
                     f"image processor and image_seq_len (processor_config.json)")
  spec = ImageSpec.from_hf_dict(image_processor.to_dict(), max_tiles=max_tiles, source=f"{path}: image processor")
  return spec, int(image_seq_len)


def image_spec_for(path: str | os.PathLike, *, tile_size: int, image_seq_len: int, max_tiles: int = 0) -> ImageSpec:
  """The checkpoint's image settings, checked against the vision tower it feeds."""
  spec, processor_seq_len = load_image_spec(path, max_tiles=max_tiles)
  if spec.size != tile_size:
    raise ValueError(f"{path}: the image processor makes {spec.size} px tiles (max_image_size) but the vision tower "
                     f"reads {tile_size} px images")
  if processor_seq_len != image_seq_len:
    raise ValueError(f"{path}: the processor puts {processor_seq_len} <image> tokens per tile (image_seq_len) but "
                     f"the model makes {image_seq_len} features per tile")
  return spec

"""Idefics3 and PaliGemma processors and tokenizers built inside the tests (no download).

Idefics3: the tokenizer is byte-level BPE like SmolVLM's (SmolLM2's), trained on the
given texts, with SmolVLM's special tokens: the image tokens, the 6 x 6 tile
position tokens and a BOS that the tokenizer adds by itself, so that the prefix
handling is exercised too. "\\n\\n" is a single token, as in SmolLM2, so the
newline between the last tile row and the global image must be tokenised as one run.

PaliGemma: a transformers GemmaTokenizer (BPE with byte fallback, spaces as "▁",
Gemma's <pad> <eos> <bos> <unk> <mask> ids) over a vocabulary trained on the given
texts, in which "\\n\\n" is again one token; like Gemma's it has no <image>, which
PaliGemmaProcessor adds itself (with its <locNNNN>/<segNNN> tokens).
"""

from __future__ import annotations

import copy
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import numpy as np
import tokenizers
import transformers
from PIL import Image
from tokenizers import decoders, models, normalizers, pre_tokenizers, processors, trainers

from pixrec_jax.data import prompts

BOS = "<|im_start|>"
EOS = "<|endoftext|>"
IMAGE_TOKENS = ["<fake_token_around_image>", "<image>", "<global-img>", "<end_of_utterance>"]
TILE_TOKENS = [f"<row_{r}_col_{c}>" for r in range(1, 7) for c in range(1, 7)]
SPECIAL_TOKENS = [EOS, BOS] + IMAGE_TOKENS + TILE_TOKENS


def bpe_tokenizer(texts, vocab_size: int = 400) -> transformers.PreTrainedTokenizerFast:
  backend = tokenizers.Tokenizer(models.BPE())
  backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  backend.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
  corpus = list(texts) + list(prompts.PROMPT_PHRASES) + ["\n\n"] * 50
  backend.train_from_iterator(corpus, trainer)
  backend.add_special_tokens([tokenizers.AddedToken(t, special=True, normalized=False) for t in SPECIAL_TOKENS])
  backend.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", special_tokens=[(BOS, backend.token_to_id(BOS))])
  return transformers.PreTrainedTokenizerFast(tokenizer_object=backend, bos_token=BOS, eos_token=EOS, pad_token=EOS,
                                              extra_special_tokens=IMAGE_TOKENS + TILE_TOKENS)


def image_processor(**kwargs) -> transformers.Idefics3ImageProcessorPil:
  return transformers.Idefics3ImageProcessorPil(**kwargs)


def idefics3_processor(tokenizer, image_seq_len: int, **image_kwargs) -> transformers.Idefics3Processor:
  return transformers.Idefics3Processor(image_processor=image_processor(**image_kwargs), tokenizer=tokenizer,
                                        image_seq_len=image_seq_len)


def random_image(rng: np.random.Generator, width: int, height: int, mode: str = "RGB") -> Image.Image:
  channels = {"RGB": 3, "RGBA": 4, "L": 1, "LA": 2}[mode]
  pixels = rng.integers(0, 256, size=(height, width, channels), dtype=np.uint8)
  return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


GEMMA_SPECIAL_TOKENS = ["<pad>", "<eos>", "<bos>", "<unk>", "<mask>"]


def gemma_tokenizer(texts, vocab_size: int = 700, add_bos_token: bool = True) -> transformers.GemmaTokenizer:
  """A Gemma-style tokenizer that, like the Hub's, adds its BOS by itself unless told not to."""
  backend = tokenizers.Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True, fuse_unk=True))
  backend.normalizer = normalizers.Replace(" ", "\u2581")
  # Merges learnt within words only, so that item texts are several tokens long; GemmaTokenizer itself
  # then applies them to whole strings, as sentencepiece does.
  backend.pre_tokenizer = pre_tokenizers.Split("\u2581", behavior="merged_with_next")
  byte_tokens = [f"<0x{b:02X}>" for b in range(256)]  # Byte fallback: no text is unknown.
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=GEMMA_SPECIAL_TOKENS + byte_tokens,
                                show_progress=False)
  backend.train_from_iterator(list(texts) + list(prompts.PROMPT_PHRASES) + ["\n\n"] * 50, trainer)
  model = json.loads(backend.to_str())["model"]
  merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in model["merges"]]
  return transformers.GemmaTokenizer(vocab=model["vocab"], merges=merges, add_bos_token=add_bos_token)


def siglip_image_processor(**kwargs) -> transformers.SiglipImageProcessorPil:
  return transformers.SiglipImageProcessorPil(**kwargs)


def paligemma_processor(tokenizer, image_seq_len: int, size: int, **image_kwargs) -> transformers.PaliGemmaProcessor:
  """PaliGemmaProcessor over a copy of `tokenizer`: the processor adds tokens to its tokenizer and turns
  its BOS off."""
  image_processor = siglip_image_processor(size={"height": size, "width": size}, image_seq_length=image_seq_len,
                                           **image_kwargs)
  return transformers.PaliGemmaProcessor(image_processor=image_processor, tokenizer=copy.deepcopy(tokenizer))

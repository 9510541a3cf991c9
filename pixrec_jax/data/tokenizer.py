"""A word-level tokenizer built locally and saved in Hugging Face format.

The synthetic dataset cannot rely on downloading a pretrained tokenizer, and its
texts use a small closed vocabulary, so one id per whitespace-separated word is
enough and keeps tiny test models tiny. Saving it with `save_pretrained` lets the
rest of the code load every tokenizer, pretrained or local, with
`AutoTokenizer.from_pretrained`.
"""

import os
import pathlib
from collections.abc import Iterable

import tokenizers
import transformers
from tokenizers import models, pre_tokenizers

from pixrec_jax.data import prompts

PAD_TOKEN = "<pad>"
UNK_TOKEN = "<unk>"
EOS_TOKEN = "<|endoftext|>"
# The image placeholders SmolVLM's (Idefics3) processor puts into prompts.
IMAGE_TOKEN = "<image>"
FAKE_IMAGE_TOKEN = "<fake_token_around_image>"
GLOBAL_IMAGE_TOKEN = "<global-img>"
IMAGE_TOKENS = (IMAGE_TOKEN, FAKE_IMAGE_TOKEN, GLOBAL_IMAGE_TOKEN)
# Order fixes the ids: <pad> is 0.
SPECIAL_TOKENS = (PAD_TOKEN, UNK_TOKEN, EOS_TOKEN) + IMAGE_TOKENS


def build_word_tokenizer(texts: Iterable[str], out_dir: str | os.PathLike) -> pathlib.Path:
  """Builds a WordLevel tokenizer over `texts` and the prompt phrases; saves it.

  The vocabulary is SPECIAL_TOKENS, then every whitespace-split word of `texts` and
  of `prompts.PROMPT_PHRASES`, sorted and deduplicated, so the same texts always
  give the same ids. Special tokens are registered as added tokens, which the
  backend matches before pre-tokenization: `Image: <image><image>` splits into
  `Image:`, `<image>`, `<image>` even without spaces. There are no BOS/EOS
  templates, so encoded prompt pieces can be concatenated as they are.

  Args:
    texts: the texts the model will read, e.g. every rendered item text.
    out_dir: folder to save into (created if missing).

  Returns:
    `out_dir` as a path, ready for `AutoTokenizer.from_pretrained`.
  """
  words = set()
  for text in (*texts, *prompts.PROMPT_PHRASES):
    words.update(text.split())
  words.difference_update(SPECIAL_TOKENS)
  vocab = {token: index for index, token in enumerate((*SPECIAL_TOKENS, *sorted(words)))}

  backend = tokenizers.Tokenizer(models.WordLevel(vocab=vocab, unk_token=UNK_TOKEN))
  backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
  backend.add_special_tokens(
      [tokenizers.AddedToken(token, special=True, normalized=False) for token in SPECIAL_TOKENS]
  )
  tokenizer = transformers.PreTrainedTokenizerFast(
      tokenizer_object=backend,
      pad_token=PAD_TOKEN,
      unk_token=UNK_TOKEN,
      eos_token=EOS_TOKEN,
      extra_special_tokens=list(IMAGE_TOKENS),
  )
  out_dir = pathlib.Path(out_dir)
  tokenizer.save_pretrained(out_dir)
  return out_dir

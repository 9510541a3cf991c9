import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest
import transformers

from pixrec_jax.data import catalog, examples, images, synthetic


@pytest.fixture(scope="session")
def small_dataset(tmp_path_factory):
  """A small synthetic catalogue: 30 product lines, 80 users."""
  return synthetic.generate(tmp_path_factory.mktemp("synthetic") / "data", synthetic.SyntheticOptions(num_users=80))


@pytest.fixture(scope="session")
def word_tokenizer(small_dataset):
  return transformers.AutoTokenizer.from_pretrained(str(small_dataset.tokenizer_path))


def make_builder(dataset, tokenizer, *, text_only: bool, image_seq_len: int = 4, image_size: int = 32,
                 max_history: int = 5, max_item_tokens: int = 0):
  texts = [dataset.item_text(i) for i in range(dataset.num_items)]
  layout = examples.PromptBuilder.plan(tokenizer, texts, max_history=max_history,
                                       image_seq_len=0 if text_only else image_seq_len, image_size=image_size,
                                       max_item_tokens=max_item_tokens)
  store = None if text_only else images.ImageStore([dataset.image_path(i) for i in range(dataset.num_items)],
                                                   images.ImageSpec(image_size))
  return examples.PromptBuilder(tokenizer, texts, store, layout)


@pytest.fixture(scope="session")
def image_builder(small_dataset, word_tokenizer):
  return make_builder(small_dataset, word_tokenizer, text_only=False)


@pytest.fixture(scope="session")
def text_builder(small_dataset, word_tokenizer):
  return make_builder(small_dataset, word_tokenizer, text_only=True)


@pytest.fixture(scope="session")
def small_splits(small_dataset):
  return catalog.leave_one_out(small_dataset)

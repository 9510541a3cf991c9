import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The suite compiles a few hundred tiny programs and runs each a few times, so compiling is most of its
# time: XLA's cheapest CPU code generation about halves it (a tiny PixRec step with its update: 14.8 ->
# 8.1 s) and computes the same values within every test's tolerance (the bitwise tests compare runs made
# under the same flags). The main job, bench/ and users keep XLA's defaults; PIXREC_TEST_XLA_DEFAULTS=1
# runs the suite under them too. Set before jax starts its backend; test children inherit it.
if os.environ.get("PIXREC_TEST_XLA_DEFAULTS") != "1":
  os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), "--xla_backend_optimization_level=0",
                                      "--xla_llvm_disable_expensive_passes=true"]).strip()

import pytest
import transformers

from pixrec_jax.data import catalog, examples, images, synthetic


def tiny_pixrec_fn(tokenizer, tie: bool = False, text_only: bool = False):
  """A maker of the tests' tiny SmolVLM-family PixRec (one text and one vision layer) for `tokenizer`."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  from pixrec_jax.models.backbone import Backbone  # pylint: disable=import-outside-toplevel
  from pixrec_jax.models.config import BackboneConfig, Runtime, TextConfig, VisionConfig  # pylint: disable=import-outside-toplevel
  from pixrec_jax.recsys.model import HeadsConfig, PixRec  # pylint: disable=import-outside-toplevel

  text = TextConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                    num_attention_heads=4, num_key_value_heads=2, head_dim=8, tie_word_embeddings=tie)
  vision = VisionConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                        image_size=32, patch_size=8)
  cfg = BackboneConfig("idefics3", text, vision, scale_factor=2,
                       image_token_id=tokenizer.convert_tokens_to_ids("<image>"))
  return lambda: PixRec(Backbone(cfg, Runtime(), rngs=nnx.Rngs(0)), HeadsConfig(proj_dim=16, text_only=text_only),
                        rngs=nnx.Rngs(1))


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

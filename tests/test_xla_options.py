"""pixrec_jax.xla_options: the CPU compiler options, the user's XLA_FLAGS winning over them, a jaxlib that
lacks one, and the train step and the evaluation towers compiling with them."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from pixrec_jax import xla_options
from pixrec_jax.eval import ranking
from tests import tiny_backbones

BOGUS = {"xla_cpu_no_such_option_for_this_test": "1"}


@pytest.fixture(autouse=True)
def _fresh_cache():
  xla_options._accepted_cpu_options.cache_clear()
  ranking._jitted.cache_clear()
  yield
  xla_options._accepted_cpu_options.cache_clear()
  ranking._jitted.cache_clear()


def test_cpu_gets_the_dot_fusion_option_and_other_platforms_none(monkeypatch):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  assert xla_options.compiler_options("cpu") == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  assert xla_options.compiler_options("gpu") is None and xla_options.compiler_options("tpu") is None
  options = xla_options.compiler_options("cpu")
  options.clear()  # a caller's copy: the next caller still gets the options
  assert xla_options.compiler_options("cpu")


def test_xla_flags_naming_the_option_win(monkeypatch):
  monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT")
  assert xla_options.compiler_options("cpu") is None


def test_an_option_this_jaxlib_lacks_is_logged_and_left_out(monkeypatch, caplog):
  monkeypatch.delenv("XLA_FLAGS", raising=False)
  monkeypatch.setattr(xla_options, "CPU_OPTIONS", {**BOGUS, **xla_options.CPU_OPTIONS})
  with caplog.at_level(logging.WARNING):
    options = xla_options.compiler_options("cpu")
  assert options == {"xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_DOT"}
  assert "xla_cpu_no_such_option_for_this_test" in caplog.text and "compiling without it" in caplog.text


def test_same_values_with_and_without_the_options():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.standard_normal((256, 32)), jnp.float32)
  params = tuple(jnp.asarray(rng.standard_normal(s) * 0.1, jnp.float32) for s in ((32, 64), (32, 64), (64, 32)))
  loss = lambda p, x: jnp.sum(((jax.nn.silu(x @ p[0]) * (x @ p[1])) @ p[2])**2)
  grads = [jax.jit(jax.grad(loss), compiler_options=o)(params, x) for o in (None, xla_options.compiler_options())]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_the_train_step_and_the_towers_compile_with_the_options(monkeypatch):
  """An option XLA does not know fails the compile by name: so the step and the towers do pass ours on."""
  monkeypatch.setattr(xla_options, "compiler_options", lambda platform=None: dict(BOGUS))
  trainer = tiny_backbones.text_only_trainer(num_hidden_layers=1)
  b, s = 2, 8
  batch = dict(full_ids=np.zeros((b, s), np.int32), full_mask=np.ones((b, s), np.int32),
               user_mask=np.ones((b, s), np.int32), target_mask=np.zeros((b, s), np.int32),
               nig_positions=np.zeros((b, 1), np.int32), nig_labels=np.zeros((b, 1), np.int32),
               nig_weights=np.ones((b, 1), np.float32), item_ids=np.zeros((b, 4), np.int32),
               item_mask=np.ones((b, 4), np.int32), target_item=np.arange(b, dtype=np.int32))
  with pytest.raises(Exception, match="xla_cpu_no_such_option_for_this_test"):
    trainer.lower(batch).compile()
  graphdef, state = nnx.split(nnx.Linear(2, 2, rngs=nnx.Rngs(0)))
  tower = ranking._jitted(lambda model, batch: model(batch), graphdef, trainer.mesh)
  with pytest.raises(Exception, match="xla_cpu_no_such_option_for_this_test"):
    tower((state,), jnp.ones((1, 2)))

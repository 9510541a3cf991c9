"""Config files and command-line overrides, big_vision style.

A config file is a Python module with `get_config(arg: str | None) -> ConfigDict`;
`--config path.py:arg` passes `arg` (comma-separated options, e.g. `text_only`).
`--config.train.steps=200` overrides one leaf, parsed to the type the leaf already
has. A key that does not exist fails and lists the keys that do. A config may list
dotted keys in `required` (e.g. `("data.path", "model.path")`): the job refuses to
start while any of them is empty, naming it.

Every config also gets the job settings of `job_defaults()` (checkpointing, what a
non-finite loss does, multi-process setup) for the keys it does not set itself, so that all configs
have them and their defaults live in one place.
"""

from __future__ import annotations

import ast
import importlib.util
import pathlib
import sys
from typing import Any, Sequence

import ml_collections

from pixrec_jax import distributed  # reads no jax: config parsing stays fast

USAGE = ("usage: python -m pixrec_jax.main --config CONFIG.py[:ARGS] [--workdir DIR] [--config.KEY=VALUE ...]")


class ConfigError(ValueError):
  pass


def job_defaults() -> ml_collections.ConfigDict:
  """Settings every job has; a config file sets any of them to override it."""
  c = ml_collections.ConfigDict()
  c.checkpoint = ml_collections.ConfigDict()
  c.checkpoint.every_steps = 200  # also at the last step, and at a preemption (SIGTERM)
  c.checkpoint.keep = 3  # the latest N; the best by best_metric is kept besides
  c.checkpoint.best_metric = "valid/recall@10"  # only with eval_every_steps > 0
  c.checkpoint.eval_every_steps = 0  # validate at the checkpoints of these steps (0: never; it costs a pass)
  c.checkpoint["async"] = True  # write in the background while training goes on
  c.train = ml_collections.ConfigDict()
  c.train.nonfinite = "stop"  # a non-finite loss or gradient: "stop" the run, or "skip" that update
  c.train.grad_accum_steps = 1  # k microbatches per update, the same update as the whole batch
  c.train.freeze = ()  # parameter path patterns that never train, in any mode (see models.lora)
  c.lora = ml_collections.ConfigDict()  # adapters on the linears that `targets` name (models.lora)
  c.lora.rank = 0  # 0: off; > 0: the base weights freeze, adapters and heads train
  c.lora.alpha = 8.0  # the update is scaled by alpha / rank
  c.lora.dropout = 0.0  # on the adapters' input, in training only
  c.lora.targets = ("text_model/**/mlp/(gate|up|down)_proj",)  # models.lora.PAPER_TARGETS
  c.distributed = distributed.default_config()  # several processes: when and how they meet
  c.cpu = ml_collections.ConfigDict()
  c.cpu.reuse_step_memory = True  # CPU backend: each step's scratch memory reused, not mapped afresh (host_memory)
  c.eval = ml_collections.ConfigDict()
  c.eval.cache = True  # keep the catalogue's item embeddings per checkpoint in WORKDIR/cache
  c.eval.baselines = ("popularity", "last_item_nn")  # ranked beside the model in report.md
  c.eval.report = True  # report.json, report.md, recall_ndcg.png and gallery.html in the workdir
  c.eval.gallery_users = 8  # test users shown in gallery.html (0: no gallery)
  c.eval.top_k = 10  # items recommended per gallery user
  c.eval.seeds = ()  # e.g. (0, 1, 2): one run per seed in WORKDIR/seed_N, then their mean and std
  c.eval.protocol = "dense"  # dense (two towers) | generative (the paper's: beam search + BM25) | both
  c.eval.generative = ml_collections.ConfigDict()  # pixrec_jax.eval.generative
  c.eval.generative.num_beams = 8  # the paper: 32
  c.eval.generative.max_new_tokens = 0  # 0: the longest item text (data.max_item_tokens); the paper: 50
  c.eval.generative.repetition_penalty = 1.2
  c.eval.generative.length_penalty = 1.0  # beam score = sum of log-probabilities / new tokens ** this
  c.eval.generative.early_stopping = False  # transformers' meaning: False, True or "never"
  c.eval.generative.eps = 1 / 5000  # each beam's BM25 scores weigh exp(eps * beam score)
  c.eval.generative.do_sample = False  # the paper sampled (temperature 0.5): random metrics; off by default
  c.eval.generative.temperature = 0.5
  c.eval.generative.seed = 0
  c.eval.generative.batch_size = 8  # users per beam search, num_beams rows each
  c.eval.generative.max_users = 0  # 0: every case of a split; N > 0: its first N (a faster estimate)
  return c


def _fill_defaults(cfg: ml_collections.ConfigDict, defaults: ml_collections.ConfigDict) -> None:
  for key, value in defaults.items():
    if isinstance(value, ml_collections.ConfigDict):
      if key not in cfg:
        cfg[key] = ml_collections.ConfigDict()
      _fill_defaults(cfg[key], value)
    elif key not in cfg:
      cfg[key] = value


def load_config_file(spec: str) -> ml_collections.ConfigDict:
  path, _, arg = spec.partition(":")
  file = pathlib.Path(path)
  if not file.is_file():
    raise ConfigError(f"config file {path!r} does not exist")
  module_spec = importlib.util.spec_from_file_location(f"_pixrec_config_{file.stem}", file)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  if not hasattr(module, "get_config"):
    raise ConfigError(f"{path}: defines no get_config(arg)")
  cfg = module.get_config(arg or None)
  if not isinstance(cfg, ml_collections.ConfigDict):
    raise ConfigError(f"{path}: get_config must return an ml_collections.ConfigDict, got {type(cfg).__name__}")
  _fill_defaults(cfg, job_defaults())
  cfg.lock()
  return cfg


def leaf_keys(cfg: ml_collections.ConfigDict, prefix: str = "") -> list[str]:
  out = []
  for key in sorted(cfg.keys()):
    value = cfg[key]
    if isinstance(value, ml_collections.ConfigDict):
      out += leaf_keys(value, f"{prefix}{key}.")
    else:
      out.append(f"{prefix}{key}")
  return out


def _parse_value(raw: str, current: Any, key: str) -> Any:
  if isinstance(current, bool):
    lowered = raw.strip().lower()
    if lowered in ("true", "1", "yes"):
      return True
    if lowered in ("false", "0", "no"):
      return False
    raise ConfigError(f"--config.{key}: expected true or false, got {raw!r}")
  if isinstance(current, int):
    try:
      return int(raw)
    except ValueError:
      raise ConfigError(f"--config.{key}: expected an integer, got {raw!r}") from None
  if isinstance(current, float):
    try:
      return float(raw)
    except ValueError:
      raise ConfigError(f"--config.{key}: expected a number, got {raw!r}") from None
  if isinstance(current, str):
    return raw
  if isinstance(current, (tuple, list)):
    try:
      value = ast.literal_eval(raw)
    except (ValueError, SyntaxError):
      value = tuple(v.strip() for v in raw.split(",") if v.strip())
    if not isinstance(value, (tuple, list)):
      value = (value,)
    return type(current)(value)
  try:
    return ast.literal_eval(raw)
  except (ValueError, SyntaxError):
    return raw


def override(cfg: ml_collections.ConfigDict, key: str, raw: str) -> None:
  """Sets the leaf at dotted `key` from its string form, or fails naming the valid keys."""
  node = cfg
  parts = key.split(".")
  for depth, part in enumerate(parts):
    where = ".".join(parts[:depth]) or "the top level"
    if not isinstance(node, ml_collections.ConfigDict) or part not in node:
      valid = leaf_keys(node) if isinstance(node, ml_collections.ConfigDict) else []
      raise ConfigError(f"unknown config key {key!r}: {part!r} does not exist at {where}. "
                        f"Valid keys there: {', '.join(valid)}")
    if depth == len(parts) - 1:
      current = node[part]
      if isinstance(current, ml_collections.ConfigDict):
        raise ConfigError(f"--config.{key} names a group, not a value; its keys: {', '.join(leaf_keys(current))}")
      with node.unlocked():
        node[part] = _parse_value(raw, current, key)
    else:
      node = node[part]


def check_required(cfg: ml_collections.ConfigDict) -> None:
  """Fails naming every key listed in `cfg.required` whose value is still empty."""
  missing = []
  for key in cfg.get("required", ()):
    node = cfg
    for part in key.split("."):
      if not isinstance(node, ml_collections.ConfigDict) or part not in node:
        raise ConfigError(f"required lists {key!r}, which is not a config key")
      node = node[part]
    if node is None or node == "":
      missing.append(key)
  if missing:
    raise ConfigError("required config field(s) empty: " + ", ".join(missing) + "; set "
                      + " ".join(f"--config.{k}=..." for k in missing))


def parse_args(argv: Sequence[str]) -> tuple[ml_collections.ConfigDict, pathlib.Path | None]:
  """(config with overrides applied, workdir or None) from command-line arguments."""
  spec, workdir, overrides = None, None, []
  args = list(argv)
  i = 0
  while i < len(args):
    arg = args[i]
    name, eq, value = arg.partition("=")
    takes_next = not eq and i + 1 < len(args)
    if name == "--config":
      spec = value if eq else (args[i + 1] if takes_next else None)
      i += 1 if eq else 2
    elif name == "--workdir":
      workdir = value if eq else (args[i + 1] if takes_next else None)
      i += 1 if eq else 2
    elif name.startswith("--config."):
      if not eq:
        if not takes_next:
          raise ConfigError(f"{name} needs a value: {name}=VALUE")
        value = args[i + 1]
        i += 1
      overrides.append((name[len("--config."):], value))
      i += 1
    elif name in ("-h", "--help"):
      print(USAGE)
      sys.exit(0)
    else:
      raise ConfigError(f"unrecognised argument {arg!r}\n{USAGE}")
  if not spec:
    raise ConfigError(f"--config is required\n{USAGE}")
  cfg = load_config_file(spec)
  for key, value in overrides:
    override(cfg, key, value)
  check_required(cfg)
  return cfg, pathlib.Path(workdir) if workdir else None

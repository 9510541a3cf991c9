"""Named settings presets.

PAPER is what the PixRec reference code publishes: a = 0.125, b = -0.025 (a
negative user-item weight, kept as published, not recommended), temperature 0.5,
AdamW at 1e-4, batch 1, 10 epochs, backbone frozen except the LM head. With batch
1 there are no in-batch negatives, so both contrastive terms are constant; the
preset reproduces the reference, it is not a good default.
"""

PAPER = {
    "pixrec.alpha": 0.125,
    "pixrec.beta": -0.025,
    "pixrec.temperature": 0.5,
    "train.lr": 1e-4,
    "train.batch_size": 1,
    "train.epochs": 10,
    "train.trainable": "heads_lm_head",
}


# The paper's LoRA mode: r=8, alpha 8, dropout 0.1 on the decoder's MLP linears (the paper also
# quantises the backbone to 4 bits; we keep it in model.param_dtype).
LORA = {
    "lora.rank": 8,
    "lora.alpha": 8.0,
    "lora.dropout": 0.1,
    "lora.targets": ("text_model/**/mlp/(gate|up|down)_proj",),
}


def apply(cfg, preset: dict) -> None:
  """Sets each dotted key of `preset` on an ml_collections ConfigDict."""
  for key, value in preset.items():
    node = cfg
    *parents, leaf = key.split(".")
    for p in parents:
      if p not in node:  # a group that job defaults add later (config_lib.job_defaults)
        node[p] = type(cfg)()
      node = node[p]
    node[leaf] = value

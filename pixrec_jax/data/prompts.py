"""PixRec prompt text, as PIXREC.md gives it.

The phrases are constants so that the synthetic tokenizer's vocabulary, the prompt
builder and the tests all read the same strings.
"""

# The paper's item template; fields missing from an item render as "Unknown".
ITEM_TEMPLATE = "Title: {title}. Category: {main_category}. Brand: {brand}. Price: {price}. Image: "
MISSING_FIELD = "Unknown"

HISTORY_INTRO = "This is the summary of a user's purchase history. The first item bought is as follows. "
HISTORY_NEXT = "\nThe next item bought is as follows. "
# Everything up to and including the separator is the user segment.
TARGET_SEPARATOR = "\nThe next item bought is as follows.\n"

PROMPT_PHRASES = (HISTORY_INTRO, HISTORY_NEXT, TARGET_SEPARATOR)


def template_fields(template: str) -> list[str]:
  """The field names a template refers to, in order of appearance."""
  import string

  return [name for _, name, _, _ in string.Formatter().parse(template) if name]


def render_item_text(fields: dict, template: str = ITEM_TEMPLATE) -> str:
  """Fills the item template; a missing or empty field renders as MISSING_FIELD."""
  values = {}
  for name in template_fields(template):
    value = fields.get(name)
    values[name] = MISSING_FIELD if value is None or str(value).strip() == "" else str(value)
  return template.format(**values)

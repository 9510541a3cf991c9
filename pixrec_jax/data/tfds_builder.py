"""A TFDS builder, `amazon_reviews_2023_mm`: Amazon Reviews 2023 with item texts and images.

One BuilderConfig per category (CATEGORIES). Preparing a config runs the project's
own ingestion (`ingest.ingest`: dedup, time order, meta join, MAIN image choice,
k-core, image download), so the TFDS copy holds exactly the processed dataset the
trainer would read, and writes it as two splits of one feature spec:

  users  one example per user:  user = {user_id, items, timestamps}   (item empty)
  items  one example per item:  item = {item_id, fields, the text fields, image}
                                                                        (user empty)

TFDS gives a dataset one feature spec, so both kinds of example carry both parts
and leave the other one empty (user_id "", item_id -1); `decode_user` and
`decode_item` read them back. Examples keep the processed dataset's order, so
`items[i]` is item i and `users[j]` is user j. `image` is the image file's bytes, as stored (b""
when the item has none); decode with PIL. In `array_record` format,
`tfds.data_source` reads the splits with random access, which is what grain's
`MapDataset.source` takes:

  builder = AmazonReviews2023Mm(config="Subscription_Boxes", data_dir=D, file_format="array_record")
  builder.download_and_prepare()
  users = grain.MapDataset.source(tfds.data_source("amazon_reviews_2023_mm/Subscription_Boxes",
                                                   data_dir=D)["users"])

Neither building nor reading needs TensorFlow: every feature is encoded with
numpy (images are stored as encoded bytes, never re-encoded). Inputs, in order:
1. MANUAL_DIR/<Category>/manifest.json: a processed dataset (any source, e.g.
   `paper_format`), used as it is;
2. MANUAL_DIR/<Category>.jsonl[.gz] and MANUAL_DIR/meta_<Category>.jsonl[.gz]: raw files;
3. otherwise the raw files are downloaded from the official URLs (REVIEWS_URL, META_URL).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import pathlib
from collections.abc import Iterator

import numpy as np
import tensorflow_datasets as tfds

from pixrec_jax.data import catalog, ingest

NAME = "amazon_reviews_2023_mm"
# The dataset card's 33 categories and "Unknown" (huggingface.co/datasets/McAuley-Lab/Amazon-Reviews-2023).
CATEGORIES = (
    "All_Beauty", "Amazon_Fashion", "Appliances", "Arts_Crafts_and_Sewing", "Automotive", "Baby_Products",
    "Beauty_and_Personal_Care", "Books", "CDs_and_Vinyl", "Cell_Phones_and_Accessories",
    "Clothing_Shoes_and_Jewelry", "Digital_Music", "Electronics", "Gift_Cards", "Grocery_and_Gourmet_Food",
    "Handmade_Products", "Health_and_Household", "Health_and_Personal_Care", "Home_and_Kitchen",
    "Industrial_and_Scientific", "Kindle_Store", "Magazine_Subscriptions", "Movies_and_TV",
    "Musical_Instruments", "Office_Products", "Patio_Lawn_and_Garden", "Pet_Supplies", "Software",
    "Sports_and_Outdoors", "Subscription_Boxes", "Tools_and_Home_Improvement", "Toys_and_Games",
    "Video_Games", "Unknown",
)
_RAW = "https://datarepo.eng.ucsd.edu/mcauley_group/data/amazon_2023/raw"
REVIEWS_URL = _RAW + "/review_categories/{category}.jsonl.gz"
META_URL = _RAW + "/meta_categories/meta_{category}.jsonl.gz"
# Named item text features; every field is also in `fields` (JSON), whatever its source.
TEXT_FIELDS = ingest.FIELDS


@dataclasses.dataclass(eq=False)
class Config(tfds.core.BuilderConfig):
  """One category and how to ingest it (`ingest.make_options`: a preset plus overrides).

  The default is the PixRec paper's selection (users with at least 2 reviews, items
  with a MAIN image); e.g. `Config(name="Toys_benchmark", category="Toys_and_Games",
  preset="benchmark")` makes another.
  """

  category: str = ""
  preset: str = "paper"
  overrides: dict = dataclasses.field(default_factory=dict)


def _pick(manual: pathlib.Path, stem: str) -> pathlib.Path | None:
  for name in (f"{stem}.jsonl.gz", f"{stem}.jsonl"):
    if (manual / name).is_file():
      return manual / name
  return None


class AmazonReviews2023Mm(tfds.core.GeneratorBasedBuilder):
  """Amazon Reviews 2023 users and items (texts and images), ingested by pixrec_jax."""

  name = NAME
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Users and items splits from pixrec_jax.data.ingest (dataset format v1)."}
  BUILDER_CONFIGS = [Config(name=c, category=c, description=f"Amazon Reviews 2023, {c}") for c in CATEGORIES]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Optional. Put into the manual folder either a processed dataset at <Category>/ (a
  folder with manifest.json, e.g. from pixrec_jax.data.paper_format), or the raw files
  <Category>.jsonl[.gz] and meta_<Category>.jsonl[.gz]. Without them the raw files are
  downloaded from the official URLs.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    text = {name: tfds.features.Text() for name in TEXT_FIELDS}
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__.split("\n\n")[0],
        features=tfds.features.FeaturesDict({
            "user": tfds.features.FeaturesDict({
                "user_id": tfds.features.Text(),
                "items": tfds.features.Sequence(np.int32),
                "timestamps": tfds.features.Sequence(np.int64),  # ms; positions for the paper's files
            }),
            "item": tfds.features.FeaturesDict({
                "item_id": np.int32,
                "fields": tfds.features.Text(),  # JSON object: every field of catalog.Item.fields
                **text,
                "image": tfds.features.Tensor(shape=(), dtype=np.object_),  # encoded file bytes
                "image_path": tfds.features.Text(),  # relative to the processed dataset; "" if none
            }),
        }),
        homepage="https://amazon-reviews-2023.github.io/",
        citation="""@article{hou2024bridging,
  title={Bridging Language and Items for Retrieval and Recommendation},
  author={Hou, Yupeng and Li, Jiacheng and He, Zhankui and Yan, An and Chen, Xiusi and McAuley, Julian},
  journal={arXiv preprint arXiv:2403.03952}, year={2024}}""",
        metadata=tfds.core.MetadataDict(),
        # Generation order kept: example i of `items` is item i, of `users` user i.
        disable_shuffling=True,
    )

  def _manual(self, dl_manager) -> pathlib.Path | None:
    try:
      return pathlib.Path(dl_manager.manual_dir)
    except AssertionError:  # No manual folder, or an empty one: download instead.
      return None

  def _processed(self, dl_manager) -> catalog.Dataset:
    """The processed dataset for this config: given, or ingested from raw files."""
    category = self.builder_config.category
    manual = self._manual(dl_manager)
    if manual is not None and (manual / category / catalog.MANIFEST).is_file():
      return catalog.load_dataset(manual / category)
    reviews = _pick(manual, category) if manual else None
    meta = _pick(manual, f"meta_{category}") if manual else None
    if reviews is None or meta is None:
      urls = {"reviews": REVIEWS_URL.format(category=category), "meta": META_URL.format(category=category)}
      paths = dl_manager.download(urls)
      reviews, meta = pathlib.Path(paths["reviews"]), pathlib.Path(paths["meta"])
    return raw_to_processed(reviews, meta, self.builder_config,
                            pathlib.Path(dl_manager.download_dir) / f"{NAME}_processed")

  def _split_generators(self, dl_manager):
    dataset = self._processed(dl_manager)
    self.info.metadata["manifest"] = {k: dataset.manifest[k] for k in ("name", "source", "options", "counts")}
    return {split: self._generate_examples(dataset, split) for split in ("users", "items")}

  def _generate_examples(self, dataset: catalog.Dataset, split: str) -> Iterator[tuple[str | int, dict]]:
    if split == "users":
      for user in dataset.users:
        yield user.user_id, {"user": {"user_id": user.user_id, "items": user.items, "timestamps": user.timestamps},
                             "item": _EMPTY_ITEM}
      return
    for item in dataset.items:
      path = dataset.image_path(item.item_id)
      yield item.item_id, {
          "user": _EMPTY_USER,
          "item": {
              "item_id": item.item_id,
              "fields": json.dumps(item.fields, ensure_ascii=False, sort_keys=True),
              **{name: item.fields.get(name, "") for name in TEXT_FIELDS},
              "image": path.read_bytes() if path is not None else b"",
              "image_path": item.image or "",
          },
      }


_EMPTY_USER = {"user_id": "", "items": np.zeros((0,), np.int32), "timestamps": np.zeros((0,), np.int64)}
_EMPTY_ITEM = {"item_id": -1, "fields": "{}", **{name: "" for name in TEXT_FIELDS}, "image": b"", "image_path": ""}


def raw_to_processed(reviews: pathlib.Path, meta: pathlib.Path, config: Config,
                     work_dir: pathlib.Path) -> catalog.Dataset:
  """Raw review and meta files -> a processed dataset, by the project's ingestion.

  Each set of options gets its own folder (a rerun with the same inputs is a no-op
  there); images are cached once for all of them.
  """
  options = ingest.make_options(str(reviews), str(meta), preset=config.preset, name=config.category,
                                **config.overrides)
  key = hashlib.sha256(json.dumps(options.to_json(), sort_keys=True).encode()).hexdigest()[:12]
  return ingest.ingest(work_dir / f"{config.name}-{key}", options, image_cache=work_dir / "image_cache",
                       progress=False)


def decode_user(example: dict) -> catalog.User:
  """A `users` example (as `tfds.data_source` returns it) as a catalog.User."""
  user = example["user"]
  return catalog.User(user_id=_str(user["user_id"]), items=np.asarray(user["items"], np.int32),
                      timestamps=np.asarray(user["timestamps"], np.int64))


def decode_item(example: dict) -> tuple[catalog.Item, bytes | None]:
  """An `items` example as (catalog.Item, image file bytes or None)."""
  item = example["item"]
  image = bytes(item["image"])
  return (catalog.Item(item_id=int(item["item_id"]), fields=json.loads(_str(item["fields"])),
                       image=_str(item["image_path"]) or None),
          image or None)


def _str(value) -> str:
  return value.decode("utf-8") if isinstance(value, bytes) else str(value)

"""PixRec with images against the text-only baseline on the embedded default.

Runs the main job twice (configs/demo.py and configs/demo.py:text_only, same data,
same settings otherwise) and prints both test metrics and the ratios the paper
claims in miniature: Recall@1 at least 3x, Recall@10 at least 1.4x. The last line
is one JSON object with the figures.

  python bench/demo_ratio.py --workdir workdirs/demo_ratio [--config.KEY=VALUE ...]
"""

import argparse
import json
import pathlib
import subprocess
import sys
import time


def run(config: str, workdir: pathlib.Path, extra: list[str]) -> tuple[dict, float]:
  start = time.perf_counter()
  subprocess.run([sys.executable, "-m", "pixrec_jax.main", "--config", config, "--workdir", str(workdir)] + extra,
                 check=True)
  return json.loads((workdir / "metrics.json").read_text()), time.perf_counter() - start


def ratio(a: float, b: float) -> float:
  return a / b if b > 0 else float("inf")


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--workdir", default="workdirs/demo_ratio")
  parser.add_argument("--config", default="configs/demo.py")
  args, extra = parser.parse_known_args()
  root = pathlib.Path(args.workdir)
  images, t_images = run(args.config, root / "images", extra)
  text, t_text = run(f"{args.config}:text_only", root / "text_only", extra)
  keys = list(images["test"])
  print("\n| test split | " + " | ".join(keys) + " | wall seconds |")
  print("|---|" + "---|" * (len(keys) + 1))
  print("| images | " + " | ".join(f"{images['test'][k]:.4f}" for k in keys) + f" | {t_images:.0f} |")
  print("| text only | " + " | ".join(f"{text['test'][k]:.4f}" for k in keys) + f" | {t_text:.0f} |")
  r1 = ratio(images["test"]["recall@1"], text["test"]["recall@1"])
  r10 = ratio(images["test"]["recall@10"], text["test"]["recall@10"])
  print(f"\nRecall@1 ratio images / text-only: {r1:.2f} (paper: ~3x); Recall@10 ratio: {r10:.2f} (paper: ~1.4x)")
  print(json.dumps({"images_test": images["test"], "text_only_test": text["test"], "recall@1_ratio": r1,
                    "recall@10_ratio": r10, "images_seconds": round(t_images, 1),
                    "text_only_seconds": round(t_text, 1)}))


if __name__ == "__main__":
  main()

"""The ViT demo: train a small ViT (model_configs/vit-4L3H.yaml: 4 layers, hidden 192, 4 x 4 patches of 32 x 32
images) once per method on scikit-learn's handwritten digits (1797 8 x 8 images, 10 classes: a real image set
that ships with a package), validate each model in floating point and in simulated W8A8, and print one table.

The digits are written once as class folders (80% train, 20% validation, a fixed split) and read like any
image folder (`--train_dir` / `--validation_dir`); each stage is a call of the library behind `run_vit.py` /
`validate_vit.py` with its flags printed, so it can be repeated by hand. The clipped and gated runs add the
LayerNorm after the patch embedding, as the paper's ViT runs do.

    pip install scikit-learn      # the digits
    python scripts/vit_demo.py                # vanilla, clipped softmax, gated attention
    python scripts/vit_demo.py --resume       # keep methods that finished with the same flags
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))  # run from anywhere, installed or not

from transformers_language.files import write_json_atomic, write_text_atomic  # noqa: E402
from transformers_language.jobs.method_table import head_means  # noqa: E402
from transformers_language.jobs.stages import method_stages, run_method  # noqa: E402

PATCH_LAYERNORM = ["--config_path", str(REPO / "model_configs" / "vit-4L3H-patch-layernorm.yaml")]
# The paper's ViT settings (Table 2): clipped softmax gamma = -0.0001; a linear gate per token, init_prob 0.5.
METHODS = {
    "vanilla": ["--config_path", str(REPO / "model_configs" / "vit-4L3H.yaml")],
    "clipped_softmax": [*PATCH_LAYERNORM, "--attn_softmax", "clipped(-0.0001:1)"],
    "gated_attention": [*PATCH_LAYERNORM, "--attn_gate_type", "conditional_per_token", "--attn_gate_init", "0.5"],
}
VALIDATION_SHARE = 0.2


def export_digits(root: Path) -> tuple[Path, Path]:
    """scikit-learn's digits as PNG class folders under `root` (train/ and validation/), written once."""
    train, validation = root / "train", root / "validation"
    if (root / "done").is_file():
        return train, validation
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    order = np.random.default_rng(0).permutation(len(digits.images))
    cut = int(len(order) * (1 - VALIDATION_SHARE))
    for folder, indices in ((train, order[:cut]), (validation, order[cut:])):
        for index in indices:
            pixels = (digits.images[index] * (255 / 16)).round().astype(np.uint8)  # 0..16 -> 0..255
            path = folder / str(digits.target[index]) / f"{index}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(pixels, mode="L").save(path)
    (root / "done").write_text("")
    return train, validation


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default=str(REPO / "runs" / "vit-demo"))
    parser.add_argument("--data_dir", default=str(REPO / "runs" / "digits"), help="Where the digits are written.")
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--per_device_train_batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--resume", action="store_true", help="Read back methods finished with the same flags.")
    return parser.parse_args()


def table(rows: dict[str, dict]) -> str:
    header = (
        "| method | FP top-1 | W8A8 top-1 | max inf-norm | avg kurtosis | [CLS] attention per layer "
        "| background attention per layer |"
    )
    lines = [header, "|" + " --- |" * 7]
    for method, row in rows.items():
        lines.append(
            f"| {method} | {row['fp_accuracy']:.1%} | {row['w8a8_accuracy']:.1%} | {row['max_inf_norm']:.1f} "
            f"| {row['avg_kurtosis']:.1f} | {' / '.join(f'{v:.2f}' for v in row['cls_mass'])} "
            f"| {' / '.join(f'{v:.2f}' for v in row['background_mass'])} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    args = parse_args()
    output_dir = Path(args.output_dir)
    train_dir, validation_dir = export_digits(Path(args.data_dir))
    data = ["--train_dir", str(train_dir), "--validation_dir", str(validation_dir)]
    common = [
        *data,
        "--image_size", "32",
        "--random_resized_crop_scale", "0.6", "1.0",
        "--horizontal_flip_prob", "0.0",  # digits are not mirror-symmetric
        "--per_device_train_batch_size", str(args.per_device_train_batch_size),
        "--per_device_eval_batch_size", "120",
        "--learning_rate", "1e-3",
        "--lr_scheduler_type", "cosine",
        "--num_warmup_steps", str(args.max_train_steps // 10),
        "--max_train_steps", str(args.max_train_steps),
        "--weight_decay", "0.05",
        "--label_smoothing", "0.1",
        "--seed", str(args.seed),
        "--with_tracking", "--report_to", "tensorboard", "--extra_tb_stats",
        "--tb_scalar_log_interval", str(max(args.max_train_steps // 10, 1)),
        "--tb_hist_log_interval", str(args.max_train_steps),
    ]  # fmt: skip
    evaluation = ["--validation_dir", str(validation_dir), "--per_device_eval_batch_size", "120"]
    quantize = ["--quantize", "--train_dir", str(train_dir), "--per_device_train_batch_size", "64"]

    start = time.perf_counter()
    total, rows = 3 * len(args.methods), {}
    for number, method in enumerate(args.methods):
        run_dir = output_dir / method
        evaluated = ["--model_name_or_path", str(run_dir), *evaluation]
        stages = method_stages(method, run_dir, "train ViT", [*common, *METHODS[method]], evaluated, quantize)
        method_start = time.perf_counter()
        _, fp, w8a8 = run_method(method, run_dir, stages, "image_classification", args.resume, (3 * number, total))
        rows[method] = {
            "fp_accuracy": fp["accuracy"],
            "w8a8_accuracy": w8a8["accuracy"],
            "max_inf_norm": fp["max_inf_norm"],
            "avg_kurtosis": fp["avg_kurtosis"],
            "cls_mass": head_means(fp, "first_token_mass"),
            "background_mass": head_means(fp, "background_mass"),
            "seconds": time.perf_counter() - method_start,  # its three stages (~0 when read back)
        }
    minutes = (time.perf_counter() - start) / 60
    markdown = table(rows)
    settings = {"max_train_steps": args.max_train_steps, "seed": args.seed, "methods": args.methods}
    write_json_atomic(output_dir / "summary.json", {"methods": rows, "settings": settings | {"minutes": minutes}})
    write_text_atomic(output_dir / "summary.md", markdown)
    print(f"\nViT (4 layers, hidden 192) on the digits, {args.max_train_steps} steps per method ({minutes:.1f} min):\n")
    print(markdown)
    print(f"Every statistic: {output_dir}/<method>/eval-fp/all_results.json")


if __name__ == "__main__":
    main()

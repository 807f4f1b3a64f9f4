"""Evaluate a ViT image-classifier checkpoint: accuracy, activation outliers, attention diagnostics.

accelerate launch validate_vit.py --help      (or: python validate_vit.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.validate import validate


def main(argv: list[str] | None = None) -> dict:
    return validate("image_classification", argv)


if __name__ == "__main__":
    run_cli(main)

"""Train a ViT image classifier with an attention variant.

accelerate launch run_vit.py --help      (or: python run_vit.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.pretrain import pretrain


def main(argv: list[str] | None = None) -> dict:
    return pretrain("image_classification", argv)


if __name__ == "__main__":
    run_cli(main)

"""Pre-train BERT with masked-LM loss and an attention variant.

accelerate launch run_mlm.py --help      (or: python run_mlm.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.pretrain import pretrain


def main(argv: list[str] | None = None) -> dict:
    return pretrain("mlm", argv)


if __name__ == "__main__":
    run_cli(main)

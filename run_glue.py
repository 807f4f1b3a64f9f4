"""Fine-tune a BERT-family checkpoint (any attention variant, or a stock BERT / BertModel) on a GLUE task.

accelerate launch run_glue.py --help      (or: python run_glue.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.pretrain import pretrain


def main(argv: list[str] | None = None) -> dict:
    return pretrain("glue", argv)


if __name__ == "__main__":
    run_cli(main)

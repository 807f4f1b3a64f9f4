"""Evaluate a BERT masked-LM checkpoint: perplexity on fixed masks, activation outliers, attention diagnostics.

accelerate launch validate_mlm.py --help      (or: python validate_mlm.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.validate import validate


def main(argv: list[str] | None = None) -> dict:
    return validate("mlm", argv)


if __name__ == "__main__":
    run_cli(main)

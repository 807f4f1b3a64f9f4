"""Evaluate a Llama-style causal-LM checkpoint: perplexity, activation outliers, attention diagnostics.

accelerate launch validate_llama.py --help      (or: python validate_llama.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.validate import validate


def main(argv: list[str] | None = None) -> dict:
    return validate("clm", argv, family_name="llama")


if __name__ == "__main__":
    run_cli(main)

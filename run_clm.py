"""Pre-train OPT with causal-LM loss and an attention variant.

accelerate launch run_clm.py --help      (or: python run_clm.py ...)
"""

from transformers_language.errors import run_cli
from transformers_language.jobs.pretrain import pretrain


def main(argv: list[str] | None = None) -> dict:
    return pretrain("clm", argv)


if __name__ == "__main__":
    run_cli(main)

#!/usr/bin/env bash
# The demo on a fresh machine: make the virtual environment .venv (torch 2.14.1 and torchvision 0.29.1 first,
# then this project) unless it is there, then run scripts/demo.py with the arguments given (e.g. --full).
# Data and tokenizer: $OFT_SHARED, default ../shared beside the checkout, else the HF hub.
set -euo pipefail
cd "$(dirname "$0")/.."
if ! .venv/bin/python -c "import transformers_language, quantization" 2>/dev/null; then
  echo "Setting up .venv (torch==2.14.1 and torchvision==0.29.1, then the project) ..."
  python3 -m venv .venv
  .venv/bin/pip install --quiet torch==2.14.1 torchvision==0.29.1
  .venv/bin/pip install --quiet -e .
fi
exec .venv/bin/python scripts/demo.py "$@"

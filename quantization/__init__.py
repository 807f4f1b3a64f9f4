"""Torch-only W8A8 quantization simulation (quantizers, range estimators, quantized modules).

Imports nothing from `transformers_language`: models expose named points and modules, this package
quantizes them.
"""

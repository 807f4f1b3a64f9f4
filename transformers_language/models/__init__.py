"""The models wing: the attention seam (one attention function in HF's interface), its variants (normalisers,
gates, learned keys), the families' HF model subclasses that carry them, and how a run builds or loads one."""

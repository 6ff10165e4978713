"""Audits of a model: FLOPs and early-exit efficiency, transfer matrices, compressibility."""

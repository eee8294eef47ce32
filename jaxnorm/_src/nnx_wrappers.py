"""Placeholder: being written for issue 4."""

Dropout = SpectralNorm = WeightNorm = None

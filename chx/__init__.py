"""chx: CheXFusion-style multi-view, long-tailed chest X-ray classification."""

__version__ = "0.1.0"

"""omni-train: train OmniHuman-style human video models at cluster scale."""

__version__ = "0.1.0"

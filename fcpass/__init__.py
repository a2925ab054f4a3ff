"""fcpass: an ahead-of-time compiler pass that makes exported Diffusion Transformers cache-aware."""

__version__ = "0.1.0"

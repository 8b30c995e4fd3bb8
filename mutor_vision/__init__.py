"""mutor-vision: MuToR register tokens for autoregressive image generation (and text)."""

__version__ = "0.1.0"

"""Image tokenizers (LlamaGen VQ-16, palette) and the ImageNet -> token-shard encoder.

This package lives at the repository root and is deliberately *not* installed into
site-packages (see README, "Layout"): run from the checkout, where ``from tokenizer import ...``
resolves. The library (``mutor_vision``) never imports it: tokenizers produce token shards, the
library consumes them.
"""

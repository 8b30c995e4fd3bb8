"""MuToR-1D for Hugging Face causal LMs: the adapter (``adapter.py``), its config, data, training
(``train.py``), generation with register drafting (``generate.py``), export and the answer benchmarks.

Empty on purpose: the text path imports the register core and the shared training loop, never the
image model (``make lint`` checks it), and Hugging Face libraries load only where they are used.
"""

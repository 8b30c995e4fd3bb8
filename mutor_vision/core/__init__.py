"""The register core, shared by the image model and the text adapter; it imports no other module of
the project (only ``mutor_vision.errors``), which ``make lint`` checks (import-linter, pyproject.toml).

- ``config.py``: the register config, one set of keys for images and text (their defaults differ);
- ``registers.py``: offsets, slots, the (anchor, target, position) layout, the mask rule;
- ``loss.py``: the combined loss ``(1 - a)·L_ntp + a·L_reg``, from logits or from hidden states;
- ``linear_ce.py``: the head + cross-entropy in chunks of rows (``loss.py`` uses it);
- ``draw.py``: the inverse-CDF draw from a filtered distribution (temperature, top-k, top-p);
- ``drafting.py``: register drafting's round (acceptance rule, correction draw, next drafts) for every
  modality, and the decode counts (``DecodeStats``);
- ``device.py``: a generator's device and the host-to-GPU copy that never waits, which every layer uses.
"""

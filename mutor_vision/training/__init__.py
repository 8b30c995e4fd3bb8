"""Training: the shared loop keys (``loop_config.py``), the one loop (``loop.py``) with its runtime,
checkpoints, resume and optimiser, and the image task (``c2i.py``, its config ``config.py``).

Deliberately empty: importing a submodule runs this file, and the text task (``text/``) loads the
loop's configs without the image GPT or accelerate. Import from the submodules, e.g.
``from mutor_vision.training.c2i import train``, ``from mutor_vision.training.config import TrainConfig``.
"""

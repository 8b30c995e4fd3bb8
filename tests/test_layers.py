"""The layers at run time (``make lint`` checks the import graph with import-linter, pyproject.toml)."""

import subprocess
import sys


def test_the_text_config_loads_without_the_image_model_or_accelerate():
    # training/__init__.py is empty, and the loop keys (training/loop_config.py) import no model.
    code = (
        "import mutor_vision.text.config, sys; "
        "assert 'mutor_vision.models' not in sys.modules and 'accelerate' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)

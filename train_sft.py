"""Fine-tune a Hugging Face causal LM with MuToR-1D registers (or next-token), from an adapter config.

    accelerate launch train_sft.py --config configs/text/gsm8k_mutor.yaml model.name_or_path=/models/gemma-2b
    python train_sft.py --config configs/text/gsm8k_ntp.yaml data.hf_name=null data.jsonl=train.jsonl ...

Inputs (local paths work offline; hub names download, or come from the local cache):
  model.name_or_path  a local model directory (config, weights, tokenizer) or a hub name
  model.tokenizer     a local tokenizer directory or a hub name (default null: the model's)
  data.jsonl          a local JSONL file of prompt/answer records, or
  data.hf_name        a Hugging Face dataset (with data.hf_config, data.split); set the other one to null

Offline (no network, or HF_HUB_OFFLINE=1): use local paths; a hub name works only from the local
Hugging Face cache, else the command stops at once naming the key to set (exit 4). To try the whole
text path offline on CPU in under a minute:

    python -m mutor_vision.text.tiny --out runs/text/tiny   # a tiny Llama + tokenizer and data
    python train_sft.py --config configs/text/tiny_cpu.yaml

Overrides use dotted keys; ``--resume auto`` continues from the newest complete checkpoint.
"""

from __future__ import annotations

import sys

from mutor_vision.cli import train_main
from mutor_vision.text.config import TextTrainConfig
from mutor_vision.text.train import train_text


def main(argv: list[str] | None = None) -> int:
    return train_main(__doc__, TextTrainConfig, train_text, argv, "train_sft")


if __name__ == "__main__":
    sys.exit(main())

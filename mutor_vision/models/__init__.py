"""LlamaGen-compatible class-conditional GPT with MuToR registers."""

from mutor_vision.models.checkpoint import CheckpointError
from mutor_vision.models.config import SIZES, GPTConfig, RegisterConfig
from mutor_vision.models.gpt import GPT, GPTOutput
from mutor_vision.models.sampling import SamplingConfig, generate, generate_drafted, sample_logits, sample_uniforms

__all__ = [
    "GPT",
    "SIZES",
    "CheckpointError",
    "GPTConfig",
    "GPTOutput",
    "RegisterConfig",
    "SamplingConfig",
    "generate",
    "generate_drafted",
    "sample_logits",
    "sample_uniforms",
]

"""How the model runs fast, decided here and nowhere else: ``torch.compile`` of the training forward,
the CUDA-graph decode step, FlexAttention compiled for eager calls, and FSDP's mixed precision.

``models/`` only computes; it never compiles or shards itself (torchtitan's ``parallelize.py`` keeps
its model the same way). Callers pick what to apply: the training loop (``compile:``, FSDP through
accelerate) and sampling (``generate(compile=True)``).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator

import torch
from torch import nn

# Each (batch size, sampling settings) of a decode step is a graph of its own. Under fullgraph,
# dynamo's default limit of 8 per function makes the 9th a hard error, and one process may well
# pass it (a CFG sweep over several scales, a benchmark at several batch sizes).
GRAPH_LIMIT = 64


def compile_training_forward(model: nn.Module) -> Callable:
    """The training forward, the loss included, as one compiled function (the register mask, whose
    BlockMask creation does not trace, is built outside it by the task)."""
    return torch.compile(model)


@functools.cache
def cuda_graph(step: Callable) -> Callable:
    """``step`` compiled whole with static shapes and, on CUDA, captured as CUDA graphs and replayed
    ("reduce-overhead"): a decode step is hundreds of small kernels, bound by their launches, not by
    FLOPs. One compiled function per ``step`` for the process; it keeps one graph per distinct
    (shapes, settings). Run it inside :func:`graph_session`. On the CPU inductor compiles it (no graphs)."""
    return torch.compile(step, mode="reduce-overhead", fullgraph=True, dynamic=False)


@contextlib.contextmanager
def graph_session(model: nn.Module) -> Iterator[None]:
    """Where :func:`cuda_graph` steps of ``model`` run: its KV cache (set up before) at fixed
    addresses, since a captured graph writes into it in place, and room for ``GRAPH_LIMIT`` graphs."""
    for name, buffer in model.named_buffers():
        if ".kv_cache." in name:
            torch._dynamo.mark_static_address(buffer)
    config = torch._dynamo.config
    name = "recompile_limit" if hasattr(config, "recompile_limit") else "cache_size_limit"  # torch < 2.7
    with config.patch(**{name: max(getattr(config, name), GRAPH_LIMIT)}):
        yield


@functools.cache
def compiled_flex_attention() -> Callable:
    """FlexAttention for eager calls on CUDA: unfused it is a slow reference. One compiled function
    serves every layer and step (inside a compiled forward, the surrounding graph compiles it)."""
    from torch.nn.attention.flex_attention import flex_attention  # lazy: only the FlexAttention paths need it

    return torch.compile(flex_attention, dynamic=False)


def fsdp_mixed_precision(accelerator) -> None:
    """FSDP in bf16 computes in bf16 but reduces gradients in fp32 (left alone, FSDP reduces them in
    bf16: docs/architecture.md). A no-op without FSDP or bf16."""
    plugin = getattr(accelerator.state, "fsdp_plugin", None)
    if plugin is None or accelerator.mixed_precision != "bf16":
        return
    if plugin.fsdp_version == 2:
        from torch.distributed.fsdp import MixedPrecisionPolicy  # lazy: FSDP runs only

        plugin.mixed_precision_policy = MixedPrecisionPolicy(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, output_dtype=torch.bfloat16
        )
    else:
        from torch.distributed.fsdp import MixedPrecision  # lazy: FSDP runs only

        plugin.mixed_precision_policy = MixedPrecision(
            param_dtype=torch.bfloat16, reduce_dtype=torch.float32, buffer_dtype=torch.float32
        )

"""LlamaGen's VQ-16 image tokenizer (``vq_ds16_c2i.pt``), state-dict compatible (docs/compatibility.md §2).

256×256 images in [-1, 1] -> 16×16 codes of a 16384 × 8 L2-normalised codebook, and back.
Module names mirror the official file so it loads strictly: ``encoder.conv_blocks.{i}.res.{j}``,
``decoder.mid.{0,1,2}``, ``quantize.embedding.weight``, ``quantize.codebook_used`` ...
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from mutor_vision.files import file_sha256
from mutor_vision.models.checkpoint import check_state_dict, read_state_dict


@dataclass(frozen=True)
class VQ16Config:
    codebook_size: int = 16384
    codebook_dim: int = 8
    channels: int = 128
    channel_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
    z_channels: int = 256
    num_res_blocks: int = 2  # the decoder uses one more per level
    usage_buffer: int = 65536  # size of the (unused here) ``quantize.codebook_used`` buffer

    @property
    def downsample(self) -> int:
        return 2 ** (len(self.channel_mult) - 1)


def _norm(channels: int) -> nn.GroupNorm:
    return nn.GroupNorm(32, channels, eps=1e-6)


class ResnetBlock(nn.Module):
    def __init__(self, in_channels: int, out_channels: int) -> None:
        super().__init__()
        self.norm1 = _norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.norm2 = _norm(out_channels)
        self.conv2 = nn.Conv2d(out_channels, out_channels, 3, padding=1)
        self.nin_shortcut = nn.Conv2d(in_channels, out_channels, 1) if in_channels != out_channels else None

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))  # dropout 0 at inference
        return (x if self.nin_shortcut is None else self.nin_shortcut(x)) + h


class AttnBlock(nn.Module):
    """Single-head spatial self-attention with 1×1 q, k, v, proj_out convolutions."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.norm = _norm(channels)
        self.q, self.k, self.v, self.proj_out = (nn.Conv2d(channels, channels, 1) for _ in range(4))

    def forward(self, x: Tensor) -> Tensor:
        h = self.norm(x)
        batch, channels, height, width = h.shape
        q, k, v = (conv(h).flatten(2).transpose(1, 2)[:, None] for conv in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v)[:, 0]  # (B, HW, C), scale 1/sqrt(C)
        return x + self.proj_out(out.transpose(1, 2).reshape(batch, channels, height, width))


class Downsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.pad(x, (0, 1, 0, 1)))  # zero-pad right and bottom, as the original


class Upsample(nn.Module):
    def __init__(self, channels: int) -> None:
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class _Level(nn.Module):
    """One resolution level: res blocks (+ attention after each), then an optional resampler."""

    def __init__(self, in_ch: int, out_ch: int, blocks: int, attention: bool, resample: type | None) -> None:
        super().__init__()
        self.res = nn.ModuleList(ResnetBlock(in_ch if i == 0 else out_ch, out_ch) for i in range(blocks))
        self.attn = nn.ModuleList(AttnBlock(out_ch) for _ in range(blocks)) if attention else nn.ModuleList()
        if resample is Downsample:
            self.downsample = Downsample(out_ch)
        elif resample is Upsample:
            self.upsample = Upsample(out_ch)

    def forward(self, x: Tensor) -> Tensor:
        for i, block in enumerate(self.res):
            x = block(x)
            if len(self.attn):
                x = self.attn[i](x)
        if hasattr(self, "downsample"):
            x = self.downsample(x)
        if hasattr(self, "upsample"):
            x = self.upsample(x)
        return x


class Encoder(nn.Module):
    def __init__(self, c: VQ16Config) -> None:
        super().__init__()
        chans = [c.channels * m for m in c.channel_mult]
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(3, c.channels, 3, padding=1)
        self.conv_blocks = nn.ModuleList(
            _Level(
                c.channels if i == 0 else chans[i - 1],
                ch,
                c.num_res_blocks,
                i == last,
                None if i == last else Downsample,
            )
            for i, ch in enumerate(chans)
        )
        self.mid = nn.ModuleList(
            [ResnetBlock(chans[-1], chans[-1]), AttnBlock(chans[-1]), ResnetBlock(chans[-1], chans[-1])]
        )
        self.norm_out = _norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], c.z_channels, 3, padding=1)

    def forward(self, x: Tensor) -> Tensor:
        h = self.conv_in(x)
        for level in self.conv_blocks:
            h = level(h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h)))


class Decoder(nn.Module):
    def __init__(self, c: VQ16Config) -> None:
        super().__init__()
        chans = [c.channels * m for m in reversed(c.channel_mult)]  # 512, 256, 256, 128, 128
        last = len(chans) - 1
        self.conv_in = nn.Conv2d(c.z_channels, chans[0], 3, padding=1)
        self.mid = nn.ModuleList(
            [ResnetBlock(chans[0], chans[0]), AttnBlock(chans[0]), ResnetBlock(chans[0], chans[0])]
        )
        self.conv_blocks = nn.ModuleList(
            _Level(
                chans[0] if i == 0 else chans[i - 1], ch, c.num_res_blocks + 1, i == 0, None if i == last else Upsample
            )
            for i, ch in enumerate(chans)
        )
        self.norm_out = _norm(chans[-1])
        self.conv_out = nn.Conv2d(chans[-1], 3, 3, padding=1)

    def forward(self, z: Tensor) -> Tensor:
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level in self.conv_blocks:
            h = level(h)
        return self.conv_out(F.silu(self.norm_out(h)))  # no tanh, not clamped


class VectorQuantizer(nn.Module):
    """Nearest-neighbour lookup in an L2-normalised codebook (codes and inputs both normalised)."""

    def __init__(self, c: VQ16Config) -> None:
        super().__init__()
        self.embedding = nn.Embedding(c.codebook_size, c.codebook_dim)
        nn.init.uniform_(self.embedding.weight, -1.0 / c.codebook_size, 1.0 / c.codebook_size)
        self.register_buffer("codebook_used", torch.zeros(c.usage_buffer))  # training statistic, kept for strict loads

    def codebook(self) -> Tensor:
        return F.normalize(self.embedding.weight, dim=-1)

    def indices(self, z: Tensor) -> Tensor:
        """z (B, C, h, w) -> nearest code indices (B, h, w)."""
        flat = F.normalize(z.permute(0, 2, 3, 1).reshape(-1, z.shape[1]), dim=-1)
        codebook = self.codebook()
        # |z|² is constant per row: argmin of the distance = argmax of the dot product minus |e|²/2.
        scores = flat @ codebook.T - 0.5 * codebook.pow(2).sum(-1)
        return scores.argmax(dim=-1).view(z.shape[0], z.shape[2], z.shape[3])

    def lookup(self, indices: Tensor) -> Tensor:
        """indices (B, h, w) -> normalised codes (B, C, h, w)."""
        return self.codebook()[indices].permute(0, 3, 1, 2).contiguous()


class VQ16(nn.Module):
    """``encode`` images in [-1, 1] (B, 3, H, W) -> codes (B, H/16, W/16); ``decode`` back."""

    def __init__(self, config: VQ16Config | None = None) -> None:
        super().__init__()
        self.config = config or VQ16Config()
        self.encoder = Encoder(self.config)
        self.decoder = Decoder(self.config)
        self.quantize = VectorQuantizer(self.config)
        self.quant_conv = nn.Conv2d(self.config.z_channels, self.config.codebook_dim, 1)
        self.post_quant_conv = nn.Conv2d(self.config.codebook_dim, self.config.z_channels, 1)
        self.checksum: str | None = None  # sha256 of the loaded file (recorded in shard manifests)

    @property
    def downsample(self) -> int:
        return self.config.downsample

    @property
    def vocab_size(self) -> int:
        return self.config.codebook_size

    @torch.no_grad()
    def encode(self, images: Tensor) -> Tensor:
        return self.quantize.indices(self.quant_conv(self.encoder(images)))

    @torch.no_grad()
    def decode(self, codes: Tensor) -> Tensor:
        return self.decoder(self.post_quant_conv(self.quantize.lookup(codes)))

    @classmethod
    def from_pretrained(cls, path: str | Path, config: VQ16Config | None = None, trust: bool = False) -> VQ16:
        """Load ``vq_ds16_c2i.pt`` (state dict under ``"model"``, or raw) strictly, in eval mode."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"{path}: no such VQ checkpoint")
        state = read_state_dict(path, trust=trust)  # the GPT loader's reader: containers, prefixes, trust
        model = cls(config)
        check_state_dict(model.state_dict(), state, f"{path} does not match VQ16({model.config})")
        model.load_state_dict(state)
        model.checksum = file_checksum(path)
        return model.eval()


def decoder_in(
    vq: VQ16, dtype: torch.dtype, memory_format: torch.memory_format = torch.contiguous_format
) -> Callable[[Tensor], Tensor]:
    """``vq.decode`` with the decoder in ``dtype`` and ``memory_format`` (a copy of its weights; the
    codebook lookup and ``post_quant_conv`` stay float32): codes (B, h, w) -> images (B, 3, H, W)."""
    decoder = copy.deepcopy(vq.decoder).to(dtype=dtype, memory_format=memory_format).eval()

    @torch.no_grad()
    def decode(codes: Tensor) -> Tensor:
        return decoder(vq.post_quant_conv(vq.quantize.lookup(codes)).to(dtype=dtype, memory_format=memory_format))

    return decode


def file_checksum(path: str | Path) -> str:
    """sha256 of a file (recorded in shard manifests so shards and tokenizer stay paired)."""
    return file_sha256(path)

"""VQ-16 (random weights), the palette tokenizer and the documented preprocessing (docs/compatibility.md)."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import COLORS
from PIL import Image

from tokenizer import VQ16, PaletteTokenizer, VQ16Config, center_crop_adm, crops, to_model_input, to_uint8

TINY = VQ16Config(codebook_size=64, channels=32, z_channels=32)


def tiny_vq(seed: int = 0) -> VQ16:
    torch.manual_seed(seed)
    return VQ16(TINY).eval()


def documented_vq_state_dict(c: VQ16Config) -> dict[str, torch.Tensor]:
    """The official VQ-16 key layout, written from docs/compatibility.md §2 (not from our modules)."""
    state: dict[str, torch.Tensor] = {}

    def conv(name, cin, cout, k):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.randn(cout, cin, k, k) * 0.05, torch.zeros(cout)

    def norm(name, ch):
        state[f"{name}.weight"], state[f"{name}.bias"] = torch.ones(ch), torch.zeros(ch)

    def res(name, cin, cout):
        norm(f"{name}.norm1", cin)
        conv(f"{name}.conv1", cin, cout, 3)
        norm(f"{name}.norm2", cout)
        conv(f"{name}.conv2", cout, cout, 3)
        if cin != cout:
            conv(f"{name}.nin_shortcut", cin, cout, 1)

    def attn(name, ch):
        norm(f"{name}.norm", ch)
        for part in ("q", "k", "v", "proj_out"):
            conv(f"{name}.{part}", ch, ch, 1)

    enc = [c.channels * m for m in c.channel_mult]  # 128, 128, 256, 256, 512 at full size
    conv("encoder.conv_in", 3, c.channels, 3)
    cin = c.channels
    for level, ch in enumerate(enc):
        for j in range(2):
            res(f"encoder.conv_blocks.{level}.res.{j}", cin if j == 0 else ch, ch)
            if level == 4:
                attn(f"encoder.conv_blocks.4.attn.{j}", ch)
        if level < 4:
            conv(f"encoder.conv_blocks.{level}.downsample.conv", ch, ch, 3)
        cin = ch
    res("encoder.mid.0", enc[-1], enc[-1])
    attn("encoder.mid.1", enc[-1])
    res("encoder.mid.2", enc[-1], enc[-1])
    norm("encoder.norm_out", enc[-1])
    conv("encoder.conv_out", enc[-1], c.z_channels, 3)
    dec = enc[::-1]  # 512, 256, 256, 128, 128
    conv("decoder.conv_in", c.z_channels, dec[0], 3)
    res("decoder.mid.0", dec[0], dec[0])
    attn("decoder.mid.1", dec[0])
    res("decoder.mid.2", dec[0], dec[0])
    cin = dec[0]
    for level, ch in enumerate(dec):
        for j in range(3):
            res(f"decoder.conv_blocks.{level}.res.{j}", cin if j == 0 else ch, ch)
            if level == 0:
                attn(f"decoder.conv_blocks.0.attn.{j}", ch)
        if level < 4:
            conv(f"decoder.conv_blocks.{level}.upsample.conv", ch, ch, 3)
        cin = ch
    norm("decoder.norm_out", dec[-1])
    conv("decoder.conv_out", dec[-1], 3, 3)
    conv("quant_conv", c.z_channels, c.codebook_dim, 1)
    conv("post_quant_conv", c.codebook_dim, c.z_channels, 1)
    state["quantize.embedding.weight"] = torch.randn(c.codebook_size, c.codebook_dim)
    state["quantize.codebook_used"] = torch.zeros(65536)
    return state


def test_vq16_full_size_matches_the_documented_layout():
    with torch.device("meta"):
        model = VQ16()
    assert len(model.state_dict()) == 344
    assert abs(sum(p.numel() for p in model.parameters()) / 1e6 - 71.9) < 0.05
    documented = {k: tuple(v.shape) for k, v in documented_vq_state_dict(VQ16Config()).items()}
    assert documented == {k: tuple(v.shape) for k, v in model.state_dict().items()}


def test_vq16_encode_decode_shapes_and_nearest_code():
    vq = tiny_vq()
    images = torch.rand(2, 3, 64, 64) * 2 - 1
    codes = vq.encode(images)
    assert codes.shape == (2, 4, 4) and codes.dtype == torch.long
    assert int(codes.min()) >= 0 and int(codes.max()) < 64
    # Nearest neighbour among L2-normalised codes, by brute force.
    z = F.normalize(vq.quant_conv(vq.encoder(images)).permute(0, 2, 3, 1), dim=-1)
    codebook = F.normalize(vq.quantize.embedding.weight, dim=-1)
    distances = (z[..., None, :] - codebook).pow(2).sum(-1)
    assert torch.equal(codes, distances.argmin(-1))
    lookup = vq.quantize.lookup(codes)
    torch.testing.assert_close(lookup.norm(dim=1), torch.ones(2, 4, 4))
    assert vq.decode(codes).shape == (2, 3, 64, 64)


def test_vq16_loads_the_documented_layout_strictly(tmp_path):
    state = documented_vq_state_dict(TINY)
    torch.save({"model": state}, tmp_path / "vq.pt")
    vq = VQ16.from_pretrained(tmp_path / "vq.pt", TINY)
    for key, value in state.items():
        assert torch.equal(vq.state_dict()[key], value), key
    assert len(vq.checksum) == 64 and not vq.training
    state.pop("quantize.codebook_used")
    torch.save({"model": state}, tmp_path / "bad.pt")
    with pytest.raises(RuntimeError, match="codebook_used"):
        VQ16.from_pretrained(tmp_path / "bad.pt", TINY)


def test_palette_round_trip_exact(tmp_path):
    tokenizer = PaletteTokenizer(COLORS)
    codes = torch.randint(0, len(COLORS), (3, 8, 8))
    images = tokenizer.decode(codes)
    assert torch.equal(tokenizer.encode(images), codes)
    uint8 = torch.from_numpy(COLORS[codes.numpy()]).permute(0, 3, 1, 2)
    assert torch.equal(to_uint8(images), uint8)  # the documented uint8 conversion recovers the colours
    assert torch.equal(to_model_input(uint8.permute(0, 2, 3, 1).numpy()), images)
    tokenizer.save(tmp_path / "p.json")
    loaded = PaletteTokenizer.load(tmp_path / "p.json")
    assert np.array_equal(loaded.palette, COLORS) and loaded.checksum == tokenizer.checksum


def test_palette_fit_finds_the_colours():
    rng = np.random.default_rng(0)
    pixels = COLORS[rng.integers(0, len(COLORS), 5000)]
    fitted = PaletteTokenizer.fit(pixels, num_colors=6)
    assert {tuple(c) for c in fitted.palette} == {tuple(c) for c in COLORS}
    noisy = np.clip(pixels.astype(int) + rng.integers(-3, 4, pixels.shape), 0, 255).astype(np.uint8)
    fitted = PaletteTokenizer.fit(noisy, num_colors=6, seed=1)
    distance = np.abs(fitted.palette[:, None].astype(int) - COLORS[None].astype(int)).sum(-1).min(0)
    assert (distance <= 6).all()


def test_adm_center_crop_follows_the_documented_steps():
    rng = np.random.default_rng(0)
    image = Image.fromarray(rng.integers(0, 255, (800, 1200, 3), dtype=np.uint8))
    out = center_crop_adm(image, 256)
    # By hand: 1200x800 -> BOX halve (short side 800 >= 512) -> 600x400 -> BICUBIC 384x256 -> centre.
    half = image.resize((600, 400), resample=Image.BOX)
    resized = half.resize((384, 256), resample=Image.BICUBIC)
    expected = np.asarray(resized)[:, 64:320]
    assert np.array_equal(np.asarray(out), expected)
    original, flipped = crops(image, 256, "adm-flip")
    assert np.array_equal(np.asarray(flipped), np.asarray(original)[:, ::-1])
    ten = crops(image, 256, "ten-crop")
    assert len(ten) == 10 and all(c.size == (256, 256) for c in ten)
    with pytest.raises(ValueError, match="crop mode"):
        crops(image, 256, "five-crop")


def test_to_uint8_formula():
    x = torch.tensor([-2.0, -1.0, 0.0, 0.5, 1.0, 3.0])
    assert to_uint8(x).tolist() == [0, 0, 128, 191, 255, 255]

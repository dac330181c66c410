"""Random-weight models in the diffusers layout for the benchmarks (not committed: large).

  .venv/bin/python benchmarks/make_models.py OUT_DIR [NAME ...]

- OUT_DIR/sd21-medium: the SD 2.1 architecture (OpenCLIP-style text encoder, 4-level UNet
  with linear-projection transformers, 4-level VAE) at reduced width.
- OUT_DIR/sd21-full-arch: the SD 2.1 (512-base) architecture at full size, for the
  component comparison with diffusers.
- OUT_DIR/sd21-768-arch (only when named): SD 2.1 (768-v) at full size: as sd21-full-arch
  with upcast_attention, sample_size 96 and the v-prediction scheduler (the GPU benchmark).

With NAMEs, only those are built; without, sd21-medium and sd21-full-arch.

Tokenizer and scheduler are copied from the committed tiny model (the real CLIP vocabulary
size, the SD 2.1-base scheduler). Weights are PyTorch's default initialisation, seeded.
"""

import shutil
import sys
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextConfig, CLIPTextModel

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "tests" / "fixtures" / "models"

ARCHS = {
    "sd21-medium": dict(
        text=dict(hidden_size=512, intermediate_size=2048, num_hidden_layers=6, num_attention_heads=8),
        unet=dict(block_out_channels=(128, 256, 512, 512), attention_head_dim=(2, 4, 8, 8)),
        vae=(64, 128, 256, 256),
    ),
    "sd21-full-arch": dict(
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        unet=dict(block_out_channels=(320, 640, 1280, 1280), attention_head_dim=(5, 10, 20, 20)),
        vae=(128, 256, 512, 512),
    ),
    "sd21-768-arch": dict(
        text=dict(hidden_size=1024, intermediate_size=4096, num_hidden_layers=23, num_attention_heads=16),
        unet=dict(
            block_out_channels=(320, 640, 1280, 1280),
            attention_head_dim=(5, 10, 20, 20),
            upcast_attention=True,
            sample_size=96,
        ),
        vae=(128, 256, 512, 512),
        like="sd21-tiny",
    ),
}
DEFAULT = ["sd21-medium", "sd21-full-arch"]


def build(name: str, out: Path):
    arch = ARCHS[name]
    d = out / name
    if (d / "model_index.json").exists():
        print(f"{d} exists")
        return
    if d.exists():
        shutil.rmtree(d)
    torch.manual_seed(20261126)
    text = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=49408,
            max_position_embeddings=77,
            hidden_act="gelu",
            projection_dim=512,
            layer_norm_eps=1e-5,
            **arch["text"],
        )
    ).eval()
    text.save_pretrained(d / "text_encoder", safe_serialization=True)
    del text
    hidden = arch["text"]["hidden_size"]
    unet_args = dict(sample_size=64) | arch["unet"]
    unet = UNet2DConditionModel(
        in_channels=4,
        out_channels=4,
        down_block_types=("CrossAttnDownBlock2D",) * 3 + ("DownBlock2D",),
        up_block_types=("UpBlock2D",) + ("CrossAttnUpBlock2D",) * 3,
        layers_per_block=2,
        norm_num_groups=32,
        cross_attention_dim=hidden,
        use_linear_projection=True,
        **unet_args,
    ).eval()
    unet.save_pretrained(d / "unet", safe_serialization=True)
    del unet
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        block_out_channels=arch["vae"],
        down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4,
        layers_per_block=2,
        latent_channels=4,
        norm_num_groups=32,
        sample_size=512,
    ).eval()
    vae.save_pretrained(d / "vae", safe_serialization=True)
    # Tokenizer, scheduler (epsilon or v-prediction) and pipeline index from a committed tiny model.
    like = MODELS / arch.get("like", "sd21-base-tiny")
    for part in ["tokenizer", "scheduler"]:
        shutil.copytree(like / part, d / part)
    shutil.copy(like / "model_index.json", d / "model_index.json")
    print(f"wrote {d}")


if __name__ == "__main__":
    out = Path(sys.argv[1] if len(sys.argv) > 1 else REPO / "target" / "bench-models")
    torch.set_grad_enabled(False)
    for name in sys.argv[2:] or DEFAULT:
        build(name, out)

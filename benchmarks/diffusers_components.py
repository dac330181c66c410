"""diffusers' side of the component comparison: UNet step (guided batch), text encoder,
VAE decode, on the CPU with a given thread count. Prints one JSON line per component.

  .venv/bin/python benchmarks/diffusers_components.py MODEL_DIR --height 256 --width 256 \
      --batch 2 --reps 3 --threads 2
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, UNet2DConditionModel
from transformers import CLIPTextModel


def timed(fn, reps):
    fn()  # warm-up
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times), sum(times) / len(times)


def main():
    p = argparse.ArgumentParser()
    p.add_argument("model", type=Path)
    p.add_argument("--height", type=int, default=256)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--batch", type=int, default=2)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    common = dict(impl="diffusers", torch=torch.__version__, threads=a.threads, model=a.model.name)

    text = CLIPTextModel.from_pretrained(a.model / "text_encoder").eval()
    ids = torch.randint(0, 49408, (a.batch, 77))
    best, mean = timed(lambda: text(ids)[0], a.reps)
    hidden = text.config.hidden_size
    del text
    print(json.dumps(dict(component="text_encoder", batch=a.batch, tokens=77, best_ms=best * 1e3, mean_ms=mean * 1e3, **common)), flush=True)

    unet = UNet2DConditionModel.from_pretrained(a.model / "unet").eval()
    lat = torch.randn(a.batch, 4, a.height // 8, a.width // 8)
    ctx = torch.randn(a.batch, 77, hidden)
    best, mean = timed(lambda: unet(lat, 500, encoder_hidden_states=ctx).sample, a.reps)
    del unet
    print(json.dumps(dict(component="unet_step", batch=a.batch, height=a.height, width=a.width, best_ms=best * 1e3, mean_ms=mean * 1e3, **common)), flush=True)

    vae = AutoencoderKL.from_pretrained(a.model / "vae").eval()
    z = torch.randn(1, 4, a.height // 8, a.width // 8)
    best, mean = timed(lambda: vae.decode(z).sample, a.reps)
    print(json.dumps(dict(component="vae_decode", batch=1, height=a.height, width=a.width, best_ms=best * 1e3, mean_ms=mean * 1e3, **common)), flush=True)


if __name__ == "__main__":
    main()

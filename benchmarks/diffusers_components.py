"""diffusers' side of the component comparison: UNet step (guided batch), text encoder,
VAE decode, and optionally a whole StableDiffusionPipeline job, on the CPU with a given thread
count or on a GPU in a given dtype. Prints one JSON line per measurement.

  .venv/bin/python benchmarks/diffusers_components.py MODEL_DIR --height 256 --width 256 \
      --batch 2 --reps 3 --threads 2
  python3 benchmarks/diffusers_components.py MODEL_DIR --height 768 --width 768 --batch 2 \
      --device cuda --dtype float16 --job-steps 50
"""

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import AutoencoderKL, StableDiffusionPipeline, UNet2DConditionModel
from transformers import CLIPTextModel


def timed(fn, reps, device):
    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    fn()  # warm-up
    sync()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        sync()
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
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    p.add_argument("--job-steps", type=int, default=0, help="also time a whole DDIM job of this many steps")
    p.add_argument("--skip-components", action="store_true")
    a = p.parse_args()
    torch.set_num_threads(a.threads)
    torch.set_grad_enabled(False)
    torch.manual_seed(0)
    device, dtype = torch.device(a.device), getattr(torch, a.dtype)
    common = dict(bench="components", impl="diffusers", torch=torch.__version__, threads=a.threads, model=a.model.name,
                  device=a.device, dtype=a.dtype)
    if device.type == "cuda":
        common["gpu"] = torch.cuda.get_device_name(device)

    def emit(**fields):
        print(json.dumps(dict(**fields, **common)), flush=True)

    if not a.skip_components:
        text = CLIPTextModel.from_pretrained(a.model / "text_encoder", torch_dtype=dtype).to(device).eval()
        ids = torch.randint(0, 49408, (a.batch, 77), device=device)
        best, mean = timed(lambda: text(ids)[0], a.reps, device)
        hidden = text.config.hidden_size
        del text
        emit(component="text_encoder", batch=a.batch, tokens=77, best_ms=best * 1e3, mean_ms=mean * 1e3)

        unet = UNet2DConditionModel.from_pretrained(a.model / "unet", torch_dtype=dtype).to(device).eval()
        lat = torch.randn(a.batch, 4, a.height // 8, a.width // 8, device=device, dtype=dtype)
        ctx = torch.randn(a.batch, 77, hidden, device=device, dtype=dtype)
        best, mean = timed(lambda: unet(lat, 500, encoder_hidden_states=ctx).sample, a.reps, device)
        del unet
        emit(component="unet_step", batch=a.batch, height=a.height, width=a.width, best_ms=best * 1e3, mean_ms=mean * 1e3)

        vae = AutoencoderKL.from_pretrained(a.model / "vae", torch_dtype=dtype).to(device).eval()
        z = torch.randn(1, 4, a.height // 8, a.width // 8, device=device, dtype=dtype)
        best, mean = timed(lambda: vae.decode(z).sample, a.reps, device)
        del vae
        emit(component="vae_decode", batch=1, height=a.height, width=a.width, best_ms=best * 1e3, mean_ms=mean * 1e3)

    if a.job_steps:
        pipe = StableDiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None).to(device)
        pipe.set_progress_bar_config(disable=True)
        job = lambda: pipe(  # noqa: E731
            "a benchmark photograph", negative_prompt="blurry", height=a.height, width=a.width,
            num_inference_steps=a.job_steps, guidance_scale=7.5, output_type="np",
            generator=torch.Generator(device).manual_seed(0),
        )
        best, mean = timed(job, max(1, a.reps - 1), device)
        emit(component="job", steps=a.job_steps, height=a.height, width=a.width, best_ms=best * 1e3, mean_ms=mean * 1e3)


if __name__ == "__main__":
    main()

"""Turns a benchmarks/results/*.jsonl file into the markdown table make bench prints."""

import json
import sys

lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
machine = next((l["machine"] for l in lines if "machine" in l), {})
print(f"# sdmesh benchmarks\n\nMachine: {machine.get('cpu')}, {machine.get('cores')} cores "
      f"({machine.get('threads_used')} threads used), {machine.get('memory_gib')} GiB, {machine.get('rustc')}\n")

over = [l for l in lines if l.get("bench") == "overhead"]
if over:
    print("## 1. Mesh (gRPC over loopback) vs in-process, same jobs\n")
    print("| model | size | steps | mesh s/job | in-process s/job | overhead ms/step | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- |")
    for l in over:
        print(f"| {l['model']} | {l['size']} | {l['steps']} | {l['mesh_s_per_job']:.3f} | "
              f"{l['in_process_s_per_job']:.3f} | {l['overhead_ms_per_step']:+.2f} | {l['ratio']:.3f} |")
    print()

thr = [l for l in lines if l.get("bench") == "throughput"]
if thr:
    print(f"## 2. Throughput through the mesh ({thr[0]['model']}, {thr[0]['size']}px, {thr[0]['steps']} steps)\n")
    levels = sorted({l["concurrency"] for l in thr})
    print("| concurrent jobs | " + " | ".join(str(c) for c in levels) + " |")
    print("| --- |" + " --- |" * len(levels))
    for mode in ["on", "off"]:
        row = {l["concurrency"]: l["images_per_s"] for l in thr if l["batching"] == mode}
        base = row.get(1)
        cells = [f"{row[c]:.3f}" + (f" ({row[c] / base:.2f}x)" if base else "") if c in row else "" for c in levels]
        print(f"| batching {mode}: images/s | " + " | ".join(cells) + " |")
    print()

comp = [l for l in lines if l.get("bench") == "components"]
models = list(dict.fromkeys(l["model"] for l in comp))
if comp:
    print("## 3. candle vs diffusers, components (256x256, same machine and threads)\n")
    print("| model | component | candle ms | diffusers ms | candle / diffusers |")
    print("| --- | --- | --- | --- | --- |")
    for m in models:
        for c in ["text_encoder", "unet_step", "vae_decode"]:
            a = next((l for l in comp if l["model"] == m and l["component"] == c and l.get("impl") == "candle"), None)
            b = next((l for l in comp if l["model"] == m and l["component"] == c and l.get("impl") == "diffusers"), None)
            if a and b:
                print(f"| {m} | {c} | {a['best_ms']:.1f} | {b['best_ms']:.1f} | {a['best_ms'] / b['best_ms']:.2f} |")
    print("\n(best of the repetitions; UNet step: batch 2, no guidance doubling; VAE: one image)\n")

prof = [l for l in lines if l.get("bench") == "profile"]
for m in dict.fromkeys(l["model"] for l in prof):
    print(f"### Where candle's UNet step goes ({m}): self time per span\n")
    print("| span | self ms | share | calls |")
    print("| --- | --- | --- | --- |")
    for l in [l for l in prof if l["model"] == m]:
        print(f"| {l['span']} | {l['self_ms']:.1f} | {l['share'] * 100:.1f}% | {l['calls']} |")
    print()

"""Turns a benchmarks/results/*.jsonl file into the markdown table make bench prints."""

import json
import sys

lines = [json.loads(l) for l in open(sys.argv[1]) if l.strip()]
machine = next((l["machine"] for l in lines if "machine" in l), {})
if machine.get("gpu"):
    print(f"# sdmesh GPU benchmarks\n\nMachine: {machine['gpu']}; {machine.get('cpu')}, {machine.get('cores')} cores; "
          f"torch {machine.get('torch')}\n")
else:
    print(f"# sdmesh benchmarks\n\nMachine: {machine.get('cpu')}, {machine.get('cores')} cores "
          f"({machine.get('threads_used')} threads used), {machine.get('memory_gib')} GiB, {machine.get('rustc')}\n")



def table(title, columns, rows):
    """A markdown section: the title, a header of `columns`, one line of cells per row."""
    print(f"## {title}\n")
    print("| " + " | ".join(columns) + " |")
    print("|" + " --- |" * len(columns))
    for cells in rows:
        print("| " + " | ".join(str(c) for c in cells) + " |")
    print()


agree = [l for l in lines if l.get("bench") == "agreement"]
if agree:
    table("Agreement with the f32 CPU reference",
          ["model", "size", "component", "device", "dtype", "max abs error", "reference max", "bound", "non-finite", "ok"],
          [[l["model"], l["size"], l["component"], l["device"], l["dtype"], f"{l['max_abs_error']:.2e}",
            f"{l['reference_max_abs']:.3g}", f"{l['bound']:.2e}", l["nonfinite"], "yes" if l["ok"] else "NO"]
           for l in agree])

inv = [l for l in lines if l.get("bench") == "invariance"]
if inv:
    table("Step-level batching: a step alone vs in one pass with other jobs' steps",
          ["model", "size", "step", "rows in the pass", "device", "dtype", "same bits", "max abs diff",
           "of the output's scale"],
          [[l["model"], l["size"], l["step"], l["batch_rows"], l["device"], l["dtype"], "yes" if l["same_bits"] else "no",
            f"{l['max_abs_diff']:.2e}", f"{l['relative']:.2e}"] for l in inv])

over = [l for l in lines if l.get("bench") == "overhead"]
if over:
    print("## 1. Mesh (gRPC over loopback) vs in-process, same jobs\n")
    print("| model | size | steps | mesh s/job | in-process s/job | overhead ms/step (median pair) | mean | ratio |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for l in over:
        print(f"| {l['model']} | {l['size']} | {l['steps']} | {l['mesh_s_per_job']:.3f} | "
              f"{l['in_process_s_per_job']:.3f} | {l['overhead_ms_per_step']:+.2f} | "
              f"{l.get('mean_overhead_ms_per_step', l['overhead_ms_per_step']):+.2f} | {l['ratio']:.3f} |")
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
    print("## 3. candle vs diffusers, components (same machine, threads and dtype)\n")
    print("| model | component | size | batch | device | candle ms | diffusers ms | candle / diffusers |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    shape = lambda l: (l["model"], l["component"], l.get("height"), l.get("batch"), l.get("device", "cpu"))  # noqa: E731
    flash = lambda l: (l.get("flash_attention", False), l.get("cuda_group_norm", False), l.get("cudnn_conv", False),  # noqa: E731
                       l.get("cuda_geglu", False))
    for key, fa in dict.fromkeys((shape(l), flash(l)) for l in comp if l.get("impl") == "candle"):
        # Several rounds of the same measurement: each side's best.
        a = min((l for l in comp if shape(l) == key and flash(l) == fa and l.get("impl") == "candle"),
                key=lambda l: l["best_ms"])
        b = min((l for l in comp if shape(l) == key and l.get("impl") == "diffusers"), key=lambda l: l["best_ms"],
                default=None)
        m, c, size, batch, device = key
        size = size or "-"
        where = (f"{device} {a.get('dtype', 'f32')}" + (" flash" if fa[0] else "") + (" gn-kernel" if fa[1] else "")
                 + (" cudnn-conv" if fa[2] else "") + (" geglu-kernel" if fa[3] else ""))
        ratio = f"{a['best_ms'] / b['best_ms']:.2f}" if b else ""
        theirs = f"{b['best_ms']:.1f}" if b else ""
        print(f"| {m} | {c} | {size} | {batch} | {where} | {a['best_ms']:.1f} | {theirs} | {ratio} |")
    print("\n(best of the repetitions and rounds; UNet step: no guidance doubling, batch = rows; VAE: one image)\n")
    jobs = [l for l in comp if l["component"] == "job"]
    for j in jobs:
        ours = next((l for l in over if l["model"] == j["model"] and l["size"] == j["height"] and l["steps"] == j["steps"]), None)
        line = f"- diffusers whole job, {j['model']} {j['height']}px {j['steps']} steps ({j['dtype']}): {j['best_ms'] / 1e3:.3f} s"
        if ours:
            line += (f"; sdmesh in process {ours['in_process_s_per_job']:.3f} s "
                     f"({ours['in_process_s_per_job'] * 1e3 / j['best_ms']:.2f}x), through the mesh "
                     f"{ours['mesh_s_per_job']:.3f} s ({ours['mesh_s_per_job'] * 1e3 / j['best_ms']:.2f}x)")
        print(line)
    if jobs:
        print()

prof = [l for l in lines if l.get("bench") == "profile"]
for m, c in dict.fromkeys((l["model"], l.get("component", "unet_step")) for l in prof):
    print(f"### Where candle's {c} goes ({m}): self time per span\n")
    print("| span | self ms | share | calls |")
    print("| --- | --- | --- | --- |")
    for l in [l for l in prof if l["model"] == m and l.get("component", "unet_step") == c]:
        print(f"| {l['span']} | {l['self_ms']:.1f} | {l['share'] * 100:.1f}% | {l['calls']} |")
    print()

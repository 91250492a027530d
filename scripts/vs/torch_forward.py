"""PyTorch/transformers' side of the forward-pass comparison (scripts/device-vs.sh).

Times what `edgediff bench forward` times: one forward pass of T new tokens after CONTEXT cached
positions, for each T, on a Hugging Face checkpoint (a `synth --hf-out` one), on cuda. The cache is
filled once and cropped back to CONTEXT after every pass, so each timed pass sees the same cache.
Each T: WARMUP untimed passes, then ITERS timed ones (CUDA events around the call, synchronized);
the median is reported. Prints a Markdown table and writes JSON next to it.

    python3 scripts/vs/torch_forward.py CHECKPOINT --tokens 1,16,32 --context 1024 --dtype float16
"""

import argparse
import json
import statistics
import sys
import time

import torch
from transformers import AutoModelForCausalLM, DynamicCache


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("checkpoint")
    ap.add_argument("--tokens", default="1,16,32")
    ap.add_argument("--context", type=int, default=1024)
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--json-out")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    t0 = time.time()
    model = AutoModelForCausalLM.from_pretrained(a.checkpoint, dtype=dtype).to(a.device).eval()
    load_s = time.time() - t0
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    vocab = cfg.vocab_size
    cuda = a.device.startswith("cuda")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def events():
        # Returns a function that ends the timing and gives the GPU ms (None off cuda).
        if not cuda:
            return lambda: None
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()

        def done():
            end.record()
            torch.cuda.synchronize()
            return start.elapsed_time(end)
        return done

    rows = []
    with torch.inference_mode():
        cache = DynamicCache(config=cfg)
        ctx = torch.randint(0, vocab, (1, a.context), generator=gen).to(a.device)
        model(input_ids=ctx, past_key_values=cache, use_cache=True)
        for t in [int(x) for x in a.tokens.split(",")]:
            ids = torch.randint(0, vocab, (1, t), generator=gen).to(a.device)
            pos = torch.arange(a.context, a.context + t, device=a.device).unsqueeze(0)
            times = []
            for i in range(a.warmup + a.iters):
                sync()
                w0 = time.perf_counter()
                ev = events()
                model(input_ids=ids, position_ids=pos, past_key_values=cache, use_cache=True)
                gpu = ev()
                wall = (time.perf_counter() - w0) * 1e3
                cache.crop(-t)
                if i >= a.warmup:
                    times.append((wall, gpu if gpu is not None else wall))
            rows.append({
                "tokens": t,
                "wall_ms": statistics.median(w for w, _ in times),
                "gpu_ms": statistics.median(g for _, g in times),
            })
    name = torch.cuda.get_device_name() if cuda else "cpu"
    print(f"device: {name} (torch {torch.__version__}, {a.dtype}, eager); "
          f"context {a.context}, {a.iters} iterations, median; load {load_s:.1f} s")
    print()
    print("| tokens | ms / forward (wall) | ms (CUDA events) |")
    print("|---:|---:|---:|")
    for r in rows:
        print(f"| {r['tokens']} | {r['wall_ms']:.2f} | {r['gpu_ms']:.2f} |")
    if a.json_out:
        with open(a.json_out, "w") as f:
            json.dump({"dtype": a.dtype, "context": a.context, "rows": rows,
                       "device": name}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())

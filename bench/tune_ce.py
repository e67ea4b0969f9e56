"""Time the cross-entropy kernel's block configurations on a GPU, in one call.

The table at the top of kernels/cross_entropy.py (``SINGLE_BLOCK_MAX``, ``LOOP_BLOCK``,
``LOOP_WARPS``, ``L2_HINTS``) was chosen without a GPU. This times forward+backward
(``mean``, bfloat16, upstream gradient 1) for each candidate at the shapes that decide it,
against the roofline (logits read once + gradient written once over a copy bandwidth
measured in the same run), so one run on a GPU says which values to keep:

    python -m bench.tune_ce                 # about a minute on an H100
    python -m bench.tune_ce --out tune.json

Rows up to SINGLE_BLOCK_MAX classes are held in registers (one read); longer rows make two
passes, the second expected to hit L2 — whether it does shows as the fraction of roofline,
with and without the L2 eviction hints.
"""

from __future__ import annotations

import argparse
import json

import torch
from fused_losses.kernels import cross_entropy as ce

import fused_losses as fl

# (tokens, vocab): register-held rows at the edge, the Llama-3 vocab, the widest
SHAPES = [(8192, 32000), (8192, 50257), (8192, 128256), (4096, 262144), (1024, 262144)]
# (SINGLE_BLOCK_MAX, LOOP_BLOCK, LOOP_WARPS, L2_HINTS)
CONFIGS = [
    (32768, 32768, 32, True),  # the current default
    (32768, 32768, 32, False),
    (16384, 32768, 32, True),
    (32768, 16384, 16, True),
    (32768, 16384, 32, True),
    (32768, 16384, 32, False),
    (32768, 8192, 8, True),
    (32768, 8192, 16, True),
    (65536, 32768, 32, True),
]
KNOBS = ("SINGLE_BLOCK_MAX", "LOOP_BLOCK", "LOOP_WARPS", "L2_HINTS")


def set_config(config) -> None:
    for name, value in zip(KNOBS, config, strict=True):
        setattr(ce, name, value)


def time_config(x, t, config) -> float:
    from triton.testing import do_bench

    set_config(config)

    def step():
        x.grad = None
        fl.cross_entropy(x, t).backward()

    return do_bench(step, return_mode="median")


def copy_bandwidth() -> float:
    """Bytes per second of a 1 GiB device-to-device copy, bytes read + written."""
    from triton.testing import do_bench

    src = torch.randn(1 << 28, device="cuda")
    dst = torch.empty_like(src)
    return 2 * src.numel() * 4 / (do_bench(lambda: dst.copy_(src), return_mode="median") * 1e-3)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", help="also write the rows as JSON here")
    args = parser.parse_args(argv)
    default = tuple(getattr(ce, name) for name in KNOBS)
    bandwidth = copy_bandwidth()
    print(f"{torch.cuda.get_device_name()}: copy bandwidth {bandwidth / 1e12:.2f} TB/s")
    rows = []
    try:
        for n, v in SHAPES:
            x = torch.randn(n, v, device="cuda", dtype=torch.bfloat16).requires_grad_(True)
            t = torch.randint(0, v, (n,), device="cuda")
            floor_ms = 2 * x.numel() * x.element_size() / bandwidth * 1e3
            seen = set()
            for config in CONFIGS:
                # configs that launch the same kernel at this width time the same thing
                set_config(config)
                block, warps, single = ce.block_config(v)
                effective = (block, warps, single, config[3] and not single)
                if effective in seen:
                    continue
                seen.add(effective)
                ms = time_config(x, t, config)
                row = {"tokens": n, "vocab": v, "config": config, "launch": effective,
                       "ms": ms, "roofline_ms": floor_ms, "x_roofline": ms / floor_ms}
                rows.append(row)
                print(f"N={n:5d} V={v:6d} single<={config[0]:5d} loop {config[1]:5d}x"
                      f"{config[2]:2d}w  block={block:5d} warps={warps:2d} single={int(single)} "
                      f"L2 hints={int(effective[3])}  {ms:7.3f} ms  {ms / floor_ms:5.2f}x roofline",
                      flush=True)
            del x, t
    finally:
        set_config(default)
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"device": torch.cuda.get_device_name(), "copy_bandwidth": bandwidth,
                       "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()

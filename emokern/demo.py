"""``make demo`` / ``emokern demo``: the op on a random batch (replaced by the model demo)."""

from __future__ import annotations

import time

import torch

import emokern


def run_demo(max_new_tokens: int = 40) -> None:
    """Steer a random batch with four different mixes and print projections and timings."""
    torch.manual_seed(0)
    names = ["joy", "sadness", "anger", "fear", "disgust", "surprise"]
    batch, seq_len, dim = 4, 16, 576
    hidden = torch.randn(batch, seq_len, dim) * 3
    vectors = torch.randn(len(names), dim)
    weights = torch.zeros(batch, len(names))
    weights[1, 0] = 2.0
    weights[2, 1], weights[2, 3] = 1.5, 0.5
    weights[3, 0] = -1.0
    running = emokern.RunningProjections(batch, len(names))
    before = hidden.clone()
    emokern.steer_(hidden, vectors, weights, running=running)
    after = emokern.RunningProjections(batch, len(names))
    emokern.steer_(hidden.clone(), vectors, torch.zeros_like(weights), running=after)
    print(f"backend: {emokern.ops.resolve_backend(None, hidden.device)}")
    print("mean projection on each unit emotion direction, before -> after steering")
    print(f"{'row':<18}" + "".join(f"{n:>16}" for n in names))
    for b in range(batch):
        mix = ", ".join(f"{n}={weights[b, k]:g}" for k, n in enumerate(names) if weights[b, k])
        cells = "".join(f"{running.mean()[b, k]:+7.2f} ->{after.mean()[b, k]:+6.2f}"
                        for k in range(len(names)))
        print(f"{mix or '(none)':<18}{cells}")
    del before
    big = torch.randn(8192, 576)
    vec8 = torch.randn(8, 576)
    w8 = torch.randn(1, 8)
    h = big[None]
    emokern.steer_(h, vec8, w8)
    start = time.perf_counter()
    for _ in range(20):
        emokern.steer_(h, vec8, w8)
    fused = (time.perf_counter() - start) / 20
    start = time.perf_counter()
    for _ in range(20):
        out = h + (w8 @ vec8)[:, None]
        _ = out @ (vec8 / vec8.norm(dim=1, keepdim=True)).T
    naive = (time.perf_counter() - start) / 20
    print(f"\n8192 tokens x 576 dims, 8 emotions: fused {fused * 1e3:.2f} ms, "
          f"naive hook sequence {naive * 1e3:.2f} ms ({naive / fused:.1f}x)")

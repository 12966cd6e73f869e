"""Host cost of installed stale-KV attention on one diffusers attention layer, on this machine.

The stale-KV wrapper runs a diffusers processor under a torch function mode, so every torch call
the processor makes passes through a Python handler. This times one self-attention layer
(`Attention` with diffusers' default processor) per call, as:

    processor          the processor alone
    pass-through mode  the processor under a mode that only forwards each call (the interception cost)
    stale KV, patch    the installed stale-KV wrapper on one patch of --patches: buffer update included,
                       and its queries attend to the whole image's K/V, not the patch's only

for a small layer (host overhead dominates) and a larger one (--tokens). It also prints how many
torch calls the mode sees per layer call, and what the mode adds to one cheap torch call (a tiny
`add`, bare and under the pass-through mode), which times the interception alone. Medians of
--repeats timed calls after warm-up; other load on the machine shows in these figures.

    .venv/bin/python benchmarks/stale_kv_overhead.py [--tokens 1024] [--heads 8] [--head-dim 64] [--repeats 200]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def _median_us(call: Callable[[], Any], repeats: int) -> float:
    for _ in range(max(3, repeats // 10)):
        call()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        call()
        times.append(time.perf_counter() - started)
    return statistics.median(times) * 1e6


def measure(tokens: int, heads: int, head_dim: int, patches: int, repeats: int) -> dict[str, float]:
    import torch
    from diffusers.models.attention_processor import Attention
    from torch.overrides import TorchFunctionMode

    from executor.pipefusion.stale_kv import StaleKVState, install_stale_kv

    class Counting(TorchFunctionMode):
        def __init__(self) -> None:
            super().__init__()
            self.calls = 0

        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            self.calls += 1
            return func(*args, **(kwargs or {}))

    torch.manual_seed(0)
    layer = Attention(query_dim=heads * head_dim, heads=heads, dim_head=head_dim).eval()
    patch_tokens = tokens // patches
    whole, patch = torch.randn(1, tokens, heads * head_dim), torch.randn(1, patch_tokens, heads * head_dim)
    figures: dict[str, float] = {}
    with torch.no_grad():
        figures["processor"] = _median_us(lambda: layer(patch), repeats)
        counting = Counting()

        def passing() -> None:
            with counting:
                layer(patch)

        figures["pass-through mode"] = _median_us(passing, repeats)
        counting.calls = 0
        passing()
        figures["torch calls per layer call"] = counting.calls
        state = StaleKVState(buffer_tokens=tokens)
        handle = install_stale_kv([(layer, "none")], state)
        try:
            state.mode = "fill"
            layer(whole)
            state.mode, state.index = "patch", slice(0, patch_tokens)
            figures["stale KV, patch"] = _median_us(lambda: layer(patch), repeats)
        finally:
            handle.remove()
    return figures


def interception_us(repeats: int, calls: int = 1000) -> float:
    """Median extra microseconds the pass-through mode adds to one tiny torch call."""
    import torch
    from torch.overrides import TorchFunctionMode

    class Passing(TorchFunctionMode):
        def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
            return func(*args, **(kwargs or {}))

    one = torch.ones(4)

    def bare() -> None:
        for _ in range(calls):
            torch.add(one, one)

    def intercepted() -> None:
        with Passing():
            bare()

    return (_median_us(intercepted, repeats // 10 + 3) - _median_us(bare, repeats // 10 + 3)) / calls


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=1024, help="image tokens of the larger layer (the small one has 64)")
    parser.add_argument("--heads", type=int, default=8, help="attention heads")
    parser.add_argument("--head-dim", type=int, default=64, help="dimension per head")
    parser.add_argument("--patches", type=int, default=4, help="patches the image is cut into (one is timed)")
    parser.add_argument("--repeats", type=int, default=200, help="timed calls per figure")
    args = parser.parse_args()
    import torch

    torch.set_num_threads(1)
    print(f"pass-through mode, added per intercepted torch call: {interception_us(args.repeats):.2f} us")
    for tokens in (64, args.tokens):
        figures = measure(tokens, args.heads, args.head_dim, args.patches, args.repeats)
        print(f"{tokens} tokens, {args.heads} heads x {args.head_dim}, patch of {tokens // args.patches} tokens "
              f"({int(figures['torch calls per layer call'])} torch calls per layer call), median us per call:")
        for name in ("processor", "pass-through mode", "stale KV, patch"):
            print(f"  {name:<20}{figures[name]:>10.1f}")


if __name__ == "__main__":
    main()

"""One denoiser forward, eager and traced, alone and beside a busy Python thread.

    python -m benchmarks.denoiser_gil [--checkpoint checkpoints/demo-ladi-rl] [--questions 3] [--plans 4]

The server denoises plans in a worker thread while its event loop (HTTP, the vLLM engine's output
handling) runs Python in another. Eager PyTorch hands the GIL back and takes it again around
every op, and a thread that wants it back can wait out the switch interval (5 ms) while the other
runs Python. A traced graph (`DiffusionPolicy.trace_denoiser`) runs its ops in C++ and takes far
fewer of those trips. Prints milliseconds per forward for each combination, and the stretch
(beside / alone), as JSON. One torch thread, as in the server beside a vLLM engine.
"""
from __future__ import annotations

import argparse
import threading
import time

import torch

from clients.report import emit_json
from ladi_core.checkpoint import load_checkpoint


def ms_per_call(fn, calls: int) -> float:
    for _ in range(3):
        fn()
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return round((time.perf_counter() - t0) / calls * 1e3, 2)


class BusyThread:
    """Pure-Python work in a second thread, as a loaded event loop does, while the block runs."""

    def __enter__(self):
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._spin, daemon=True)
        self.thread.start()
        return self

    def _spin(self):
        while not self.stop.is_set():
            sum(i * i for i in range(2000))

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(prog="python -m benchmarks.denoiser_gil", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", default="checkpoints/demo-ladi-rl")
    p.add_argument("--questions", type=int, default=3)
    p.add_argument("--plans", type=int, default=4)
    p.add_argument("--prompt-tokens", type=int, default=43)
    p.add_argument("--calls", type=int, default=40)
    p.add_argument("--out")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    policy = load_checkpoint(a.checkpoint).policy.eval()
    cfg = policy.cfg
    gen = torch.Generator().manual_seed(0)
    cond = torch.randn(a.questions, a.prompt_tokens, cfg.hidden_size, generator=gen)
    mask = torch.ones(a.questions, a.prompt_tokens, dtype=torch.bool)
    rows = a.questions * a.plans
    x = torch.randn(rows, cfg.latent_tokens, cfg.latent_dim, generator=gen)
    with torch.inference_mode():
        ctx = policy.context(cond, mask).repeat(torch.full((a.questions,), a.plans))
        forward = lambda: policy.velocity(x, 0.5, ctx, 1.0)  # noqa: E731
        eager_out = forward()
        result = {"checkpoint": a.checkpoint, "rows": rows, "prompt_tokens": a.prompt_tokens, "ms_per_forward": {}}
        for name in ("eager", "traced"):
            if name == "traced":
                policy.trace_denoiser()
                assert torch.allclose(forward(), eager_out, atol=1e-5), "the traced denoiser disagrees"
            alone = ms_per_call(forward, a.calls)
            with BusyThread():
                beside = ms_per_call(forward, a.calls)
            result["ms_per_forward"][name] = {"alone": alone, "beside_busy_thread": beside,
                                              "stretch": round(beside / alone, 1)}
    return emit_json(result, a.out)


if __name__ == "__main__":
    main()

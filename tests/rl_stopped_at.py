"""`python tests/rl_stopped_at.py STEP <training.rl flags>`: training.rl, stopped (exit 75) as step
STEP begins on every rank, the way a killed job stops; for resume tests that run under torchrun."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from training import rl  # noqa: E402

STOP = int(sys.argv[1])
real_step = rl.Trainer.step


def step(self, n):
    if n == STOP:
        raise SystemExit(75)
    return real_step(self, n)


rl.Trainer.step = step
rl.main(sys.argv[2:])

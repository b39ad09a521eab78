"""TinyAgent whose runs fail the ways real ones do, for the sweep tests (tests/test_sweep.py):
"failure": "segfault" kills its process with SIGSEGV at the first step, "raise" raises (a bug),
"diverge" makes the loss NaN (a learning rate too high). Used as "tests.sweep_agent:FailingAgent"."""
import os
import signal

from tests.tiny_agent import TinyAgent
from utils.config import Key


class FailingAgent(TinyAgent):
    DEFAULTS = {"failure": Key("none", choices=("none", "segfault", "raise", "diverge"))}

    def train_step(self, batch):
        failure = self.config.failure
        if failure == "segfault":
            os.kill(os.getpid(), signal.SIGSEGV)
        if failure == "raise":
            raise RuntimeError("simulated bug in train_step")
        loss = super().train_step(batch)
        return loss * float("nan") if failure == "diverge" else loss

"""A callback that sends a real signal at a chosen step, so stop tests do not race the clock."""

import os
import signal
import subprocess
import sys

import lightning as L


class SignalAt(L.Callback):
    """Sends ``signum`` when step ``step`` ends: to this process, or from another process to the whole
    process group (as ``timeout``, batch schedulers and a terminal's Ctrl-C do)."""

    def __init__(self, step: int, signum: int = signal.SIGTERM, group: bool = False) -> None:
        self.step, self.signum, self.group = step, signum, group

    def on_train_batch_end(self, trainer: L.Trainer, *args: object) -> None:
        if trainer.global_step != self.step:
            return
        if self.group:  # the sender ignores the signal it sends to its own group
            kill = f"import os, signal as s; s.signal({self.signum:d}, s.SIG_IGN); os.killpg(0, {self.signum:d})"
            subprocess.run([sys.executable, "-c", kill], check=False)
        else:
            os.kill(os.getpid(), self.signum)

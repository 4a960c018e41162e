"""Metrics to `metrics.jsonl` and TensorBoard event files, progress to the log.

Only process 0 writes; other processes get a writer that does nothing.
"""

import json
import logging as std_logging
import os
import time

import numpy as np
from absl import logging


class MetricWriter:
    def __init__(self, workdir: str, enabled: bool = True):
        self.enabled = enabled
        if not enabled:
            return
        os.makedirs(workdir, exist_ok=True)
        self._jsonl = open(os.path.join(workdir, "metrics.jsonl"), "a", encoding="utf-8")
        from tensorboardX import SummaryWriter  # imported lazily: only the primary process writes

        self._tb = SummaryWriter(os.path.join(workdir, "tensorboard"))
        self.image_dir = os.path.join(workdir, "images")

    def scalars(self, step: int, values: dict) -> None:
        if not self.enabled:
            return
        row = {"step": int(step)}
        for k, v in values.items():
            v = float(np.asarray(v))
            row[k] = v
            self._tb.add_scalar(k, v, int(step))
        self._jsonl.write(json.dumps(row) + "\n")

    def image(self, step: int, name: str, image) -> None:
        """Writes an HxWxC image in [0, 1] as PNG and to TensorBoard."""
        if not self.enabled:
            return
        import matplotlib.pyplot as plt

        image = np.clip(np.asarray(image, np.float32), 0.0, 1.0)
        os.makedirs(self.image_dir, exist_ok=True)
        fname = os.path.join(self.image_dir, f"{name.replace('/', '_')}_{int(step):08d}.png")
        plt.imsave(
            fname,
            image.squeeze(-1) if image.shape[-1] == 1 else image,
            cmap="gray" if image.shape[-1] == 1 else None,
        )
        self._tb.add_image(name, image, int(step), dataformats="HWC")

    def flush(self) -> None:
        if self.enabled:
            self._jsonl.flush()
            self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._jsonl.close()
            self._tb.close()


def read_jsonl(path: str) -> list[dict]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]


def quiet_orbax() -> None:
    """Orbax logs every save step at INFO; keep only its warnings."""
    logging.get_absl_logger().addFilter(
        lambda r: r.levelno >= std_logging.WARNING or "/orbax/" not in r.pathname
    )


class Progress:
    """Logs step, steps/s, ETA and a few metrics."""

    def __init__(self, first_step: int, num_steps: int):
        self.num_steps = num_steps
        self._t0, self._s0 = time.perf_counter(), first_step

    def log(self, step: int, metrics: dict) -> None:
        dt = time.perf_counter() - self._t0
        rate = (step - self._s0) / dt if dt > 0 else float("nan")
        eta = (self.num_steps - step) / rate if rate > 0 else float("nan")
        shown = ", ".join(f"{k}={float(np.asarray(v)):.4g}" for k, v in list(metrics.items())[:6])
        logging.info(
            "step %d/%d  %.1f steps/s  ETA %.0fs  %s", step, self.num_steps, rate, eta, shown
        )

"""Training metrics: a CSV (rewritten atomically), TensorBoard scalars, and a loss-curve PNG at the end.

On resume, rows past the checkpoint are dropped so the CSV and the plot show one continuous run.
"""

from __future__ import annotations

import csv
import io
import logging
from pathlib import Path

from embedkit.io import atomic_write_bytes, atomic_write_text

logger = logging.getLogger(__name__)
COLUMNS = ["stage", "stage_name", "step", "loss", "lr", "tokens_per_s", "event", "value"]


class MetricsLog:
    def __init__(self, out: Path, spec, enabled: bool = True):
        self.out, self.spec, self.enabled = out, spec, enabled
        self.rows: list[dict] = []
        self.writer = None

    def open(self, resume_at: tuple[int, int] | None = None) -> None:
        if not self.enabled:
            return
        path = self.out / "metrics.csv"
        if resume_at is not None and path.is_file():
            with path.open(newline="") as handle:
                for row in csv.DictReader(handle):
                    stage, step = int(row["stage"] or -1), int(row["step"] or 0)
                    if row["event"] or (stage, step) <= resume_at:
                        self.rows.append(row)
        if self.spec.tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter  # noqa: PLC0415
            except ImportError:
                logger.warning("tensorboard is not installed (pip install 'embedkit[train]'); logging to CSV only.")
            else:
                self.writer = SummaryWriter(str(self.out / "tb"))

    def log(self, stage: int, name: str, step: int, *, loss: float, lr: float, tokens_per_s: float) -> None:
        if not self.enabled:
            return
        self.rows.append({"stage": stage, "stage_name": name, "step": step, "loss": f"{loss:.6f}", "lr": f"{lr:.3e}",
                          "tokens_per_s": f"{tokens_per_s:.1f}", "event": "", "value": ""})
        if self.writer is not None:
            self.writer.add_scalar(f"{name}/loss", loss, step)
            self.writer.add_scalar(f"{name}/lr", lr, step)
            self.writer.add_scalar(f"{name}/tokens_per_s", tokens_per_s, step)
        self._flush()

    def event(self, label: str, values: dict) -> None:
        if not self.enabled:
            return
        for key, value in values.items():
            self.rows.append({"stage": "", "stage_name": "", "step": "", "loss": "", "lr": "", "tokens_per_s": "",
                              "event": f"{label}: {key}", "value": value})
            if self.writer is not None:
                self.writer.add_text(key, f"{label}: {value}")
        self._flush()

    def _flush(self) -> None:
        if not self.spec.csv:
            return
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=COLUMNS)
        writer.writeheader()
        writer.writerows(self.rows)
        atomic_write_text(self.out / "metrics.csv", buffer.getvalue())

    def close(self) -> None:
        if not self.enabled:
            return
        if self.writer is not None:
            self.writer.close()
        if self.spec.plot:
            self.plot()

    def plot(self) -> Path | None:
        """Loss against step, one line per stage, to ``loss.png``."""
        points: dict[str, list[tuple[int, float]]] = {}
        for row in self.rows:
            if row["loss"] not in ("", None):
                points.setdefault(row["stage_name"], []).append((int(row["step"]), float(row["loss"])))
        if not points:
            return None
        try:
            import matplotlib  # noqa: PLC0415

            matplotlib.use("Agg")
            import matplotlib.pyplot as plt  # noqa: PLC0415
        except ImportError:
            logger.warning("matplotlib is not installed (pip install 'embedkit[train]'); no loss.png.")
            return None
        fig, axes = plt.subplots(1, len(points), figsize=(4.5 * len(points), 3.2), squeeze=False)
        for ax, (name, series) in zip(axes[0], points.items(), strict=True):
            ax.plot([s for s, _ in series], [v for _, v in series])
            ax.set_title(name)
            ax.set_xlabel("step")
            ax.set_ylabel("loss")
        fig.tight_layout()
        buffer = io.BytesIO()
        fig.savefig(buffer, format="png", dpi=100)
        plt.close(fig)
        return atomic_write_bytes(self.out / "loss.png", buffer.getvalue())

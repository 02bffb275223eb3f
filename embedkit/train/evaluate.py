"""STS-B scores of the embedder before training and after each stage, into results.json and the metrics."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from embedkit.evaluation import sts
from embedkit.io import atomic_write_text
from embedkit.train.config import EvaluateSpec
from embedkit.train.logs import MetricsLog

logger = logging.getLogger(__name__)


class StsReport:
    """Scores the recipe's ``evaluate.sts_splits`` (main process only) and keeps results.json up to date."""

    def __init__(self, spec: EvaluateSpec, data_dir: Path | None, out: Path, metrics: MetricsLog, main: bool):
        self.spec, self.data_dir, self.out, self.metrics, self.main = spec, data_dir, out, metrics, main
        self.results: dict = {}

    def reload(self) -> None:
        """On resume: the figures of the stages already done."""
        if self.main and (self.out / "results.json").is_file():
            self.results = json.loads((self.out / "results.json").read_text())

    def evaluate(self, embedder, label: str) -> None:
        if not self.spec.sts_splits or not self.main:
            return
        scores = {}
        saved = embedder.config.max_length
        embedder.config.max_length = self.spec.max_length
        try:
            for split in self.spec.sts_splits:
                scores[f"sts_{split}"] = round(sts.sts_spearman(embedder, self.data_dir, split), 4)
        finally:
            embedder.config.max_length = saved
        self.results[label] = scores
        self.metrics.event(label, scores)
        logger.warning("STS-B %s: %s", label, scores)
        atomic_write_text(self.out / "results.json", json.dumps(self.results, indent=2))

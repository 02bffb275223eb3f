"""``embedkit serve`` as a user runs it: a subprocess on a free localhost port, the API key from the environment."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx2
import numpy as np
from typer.testing import CliRunner

from embedkit.cli import app
from embedkit.embedder import open_model

REPO = Path(__file__).resolve().parent.parent
STORIES = REPO.parent / "shared" / "models" / "stories260K"


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def run_serve(*args: str, env: dict | None = None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "embedkit", "serve", *args], cwd=REPO, text=True,
                            env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def test_serve_command_serves_with_the_key_from_the_environment():
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    process = run_serve(str(STORIES), "--port", str(port), "--dtype", "float32", "--max-length", "48",
                        "--model-name", "tiny", env={"EMBEDKIT_API_KEY": "from-env"})
    try:
        deadline = time.monotonic() + 120
        while True:
            assert process.poll() is None, process.communicate()[1]
            try:
                if httpx2.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx2.TransportError:
                pass
            assert time.monotonic() < deadline, "embedkit serve did not become ready"
            time.sleep(0.2)
        body = {"input": ["a cat sat on the mat", "the dog ran"], "model": "tiny"}
        assert httpx2.post(url + "/v1/embeddings", json=body).status_code == 401
        response = httpx2.post(url + "/v1/embeddings", json=body, headers={"Authorization": "Bearer from-env"})
        assert response.status_code == 200, response.text
        got = np.array([d["embedding"] for d in response.json()["data"]])
        expected = open_model(STORIES, dtype="float32", max_length=48).encode(body["input"])
        assert ((got * expected).sum(1) / np.linalg.norm(got, axis=1)).min() >= 0.9999
    finally:
        process.terminate()
        _, stderr = process.communicate(timeout=30)
    # a graceful stop: uvicorn finishes, then re-raises the captured SIGTERM (exit status -15)
    assert process.returncode == -15 and "Application shutdown complete." in stderr
    assert "POST /v1/embeddings -> 200" in stderr  # the access line, with the request id before it


def test_serve_command_stops_with_one_line_when_the_model_does_not_load(tmp_path):
    process = run_serve(str(tmp_path / "missing"), "--port", str(free_port()))
    _, stderr = process.communicate(timeout=120)
    assert process.returncode == 2
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "resolved to nothing" in errors[0]


def test_serve_command_refuses_bad_limits_in_one_line():
    result = CliRunner().invoke(app, ["serve", str(STORIES), "--max-queue", "10"])
    assert result.exit_code == 2
    assert result.output.strip() == ("error: settings: max_queue_texts=10 is below max_texts_per_request=2048: a "
                                     "full-size request could never be queued; raise it.")

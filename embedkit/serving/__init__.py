"""``embedkit serve``: an OpenAI-compatible embeddings server (plus search over an index) with dynamic batching."""

from embedkit.serving.app import create_app
from embedkit.serving.batcher import DynamicBatcher, QueueFull
from embedkit.serving.config import ServeSettings, default_model_name
from embedkit.serving.server import model_loader, serve
from embedkit.serving.vectors import truncate_dimensions

__all__ = ["DynamicBatcher", "QueueFull", "ServeSettings", "create_app", "default_model_name", "model_loader",
           "serve", "truncate_dimensions"]

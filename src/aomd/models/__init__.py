"""Embedding networks, their stage taps, and checkpoints."""
from aomd.models.checkpoint import CheckpointError, load_model, read_checkpoint, save_checkpoint
from aomd.models.embedding import Architecture, EmbeddingNet

__all__ = ["Architecture", "CheckpointError", "EmbeddingNet", "load_model", "read_checkpoint", "save_checkpoint"]

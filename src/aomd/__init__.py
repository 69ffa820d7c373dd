"""aomd: knowledge distillation for deep metric learning (AOMD and its baselines)."""
__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """The embedding network saved at `path` (see `aomd.models.checkpoint.load_model`)."""
    from aomd.models.checkpoint import load_model as _load

    return _load(path, device)


__all__ = ["__version__", "load_model"]

"""aomd: knowledge distillation for deep metric learning (AOMD and its baselines)."""
__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """The embedding network saved at `path` (see `aomd.models.checkpoint.load_model`)."""
    from aomd.models.checkpoint import load_model as _load

    return _load(path, device)


def preprocess(images, base_size=256, image_size=224):
    """Image files or PIL images as a network's input batch (see `aomd.data.augment.preprocess`)."""
    from aomd.data.augment import preprocess as _preprocess

    return _preprocess(images, base_size, image_size)


__all__ = ["__version__", "load_model", "preprocess"]

"""Datasets, the HDF5 cache, class-balanced batches and tensor-op augmentation."""
from aomd.data.splits import ImageSplit, RetrievalData

__all__ = ["ImageSplit", "RetrievalData"]

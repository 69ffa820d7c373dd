"""Errors of the dataset loaders: bad or missing input the user has to fix (printed as one line)."""
from aomd.errors import UserError


class DatasetError(UserError):
    """A dataset is missing, incomplete or laid out in a way no loader accepts. The message names
    the expected layout, what was found, and where the data can be obtained."""


class BadImageError(DatasetError):
    """An image file cannot be decoded (unreadable, truncated, not an image). The message names the
    file and says how to go on (replace it, or `dataset.skip_bad_images=true`)."""

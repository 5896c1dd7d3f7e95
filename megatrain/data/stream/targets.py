"""What every objective's labels share."""

IGNORE = -100  # a label no loss counts (PyTorch's cross-entropy ``ignore_index``)

"""Reference DiT families in PyTorch, their checkpoint layouts, and the bundled digits model."""

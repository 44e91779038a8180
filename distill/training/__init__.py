"""Trainer, its config, callbacks, metrics, the model wrapper and export."""

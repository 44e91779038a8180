"""Runnable demos (not part of the installed library)."""

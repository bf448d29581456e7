"""Training: one shared loop (loop.py) and the recipes built on it."""

"""Helpers of the training recipe in :mod:`citi_engine.train`.

``config`` is torch-free (the API validates job parameters with it); the others need torch.
"""

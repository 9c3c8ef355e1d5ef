"""The inference server: an app of its own inside the worker package (``uvicorn worker.inference.app:app``).

``app`` holds the HTTP routes and the request checks (FastAPI); ``cache`` the model policy and batching, with no
web framework, so ``bench/inference.py`` runs it on a host that has torch alone. The compute is the engine's
serving runtime (:mod:`citi_engine.serving`, :mod:`citi_engine.constrained`). Nothing here is imported by the
Celery worker, and nothing here imports it.
"""

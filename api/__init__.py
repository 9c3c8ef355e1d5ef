"""The citi API (``uvicorn api.main:app``): files, fine-tuning jobs, events, adapters. Never imports torch.

Assembled in ``main``; one router module per resource under ``routers/`` (none imports another);
request and response shapes in ``schemas``; which models a caller may name in ``model_access``; auth and
shared dependencies in ``deps``. The store, storage, settings, errors and the queue to the workers are
the service core's (:mod:`citi_service`), which the workers stand on too; the API never imports ``worker``.
"""

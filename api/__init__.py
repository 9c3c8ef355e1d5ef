"""The citi API (``uvicorn api.main:app``): files, fine-tuning jobs, events, adapters. Never imports torch.

One router module per resource under ``routers/``; request and response shapes in ``schemas``;
Redis records in ``store``; artifacts through ``storage`` (local directory or S3); settings from the
environment in ``settings``; auth and shared dependencies in ``deps``; OpenAI-shaped errors in ``errors``.
"""

"""The service core both ``api/`` and ``worker/`` stand on; neither imports the other.

- ``settings``: the environment (pydantic-settings), read the same way by every process.
- ``records``: job statuses, the job event (one :class:`~citi_service.records.Event`, built by
  :func:`~citi_service.records.new_event`) and the ``fine_tuned_model`` id.
- ``store``: the job store in Redis (files, jobs, events, leases, cancel flags).
- ``keys``: where a file, a job's adapter and its checkpoints live, in storage and on a worker's disk.
- ``storage``: artifact storage (a local directory or an S3 bucket).
- ``queue``: the task name and :func:`~citi_service.queue.enqueue`, the API's one way to the workers.
- ``errors``: errors in OpenAI's shape, for the API and the inference server.
- ``chat``: the chat completion request and the checks both HTTP servers apply to it.

Nothing here imports torch or the engine's training code; it imports nothing from ``api/`` or ``worker/``.
"""

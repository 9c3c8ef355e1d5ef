"""GPU workers: Celery tasks that run fine-tuning jobs (and, in ``inference``, the inference server).

How a job runs (see ``tasks``, ``runner``, ``lease``, ``artifacts``):

1. The API stores the job as ``queued`` and sends one task carrying only its id.
2. A worker (solo pool, prefetch 1, late acks: one job at a time on its GPUs) claims the job
   atomically in Redis and takes a lease on it; a second delivery of the same task finds the lease
   (or the finished job) and is dropped, so a job never runs twice at once.
3. The job runs in a fresh child process started with ``spawn`` (nothing survives between jobs; a
   crash is contained; the worker process never imports torch). The child calls
   ``citi_engine.train.finetune`` with callbacks that write events to the store and check the cancel
   flag, the lease and the worker's life every step. It dies with its worker (PR_SET_PDEATHSIG).
4. A heartbeat renews the lease every third of ``CITI_LEASE_SECONDS``. If the worker dies, the lease
   lapses and the reaper thread that every worker runs puts the job back in the queue; the next
   worker resumes it from its last checkpoint (the engine resumes from ``out_dir/checkpoints``).
5. Checkpoints, where a second worker can find them: with ``CITI_STORAGE=local`` the job trains in a
   working directory under the artifact directory, shared by the workers of one host, and resumes in
   place. With ``CITI_STORAGE=s3`` (several hosts) it trains in local scratch (``CITI_WORK_DIR``) and
   each checkpoint is copied to ``jobs/<id>/checkpoints/`` in the bucket as soon as the engine has
   written it; a worker on another host fetches them before resuming. At most the work since the
   last copied checkpoint is lost.
6. The adapter directory (without checkpoints) goes to ``jobs/<id>/adapter/`` in storage; the job
   ends ``succeeded``, ``failed`` (with ``error.code``/``message``, partial files removed) or
   ``cancelled``.
"""

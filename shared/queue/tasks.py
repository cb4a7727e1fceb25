"""The two tasks as senders see them: names and signatures, so neither service imports the other.

Messages carry only keys (claim-check): image bytes wait in the store under `in:{uuid}`
until the job has finished; a task's outcome lives in the job store.
"""

from __future__ import annotations

from celery import Celery, Signature

from shared.store.jobs import JobStore

EMBED_TASK = "vlmq.embed"
GENERATE_TASK = "vlmq.generate"


def embed_signature(celery: Celery, jobs: JobStore, tenant: str, images: list[bytes]) -> tuple[str, Signature]:
    """Store the images and create the job; returns its id (= the task id) and the task signature
    (to send alone, or chain before a `vlmq.generate` as `vlmq caption` does)."""
    job_id = jobs.create("embed", tenant)
    blob_keys = [jobs.put_blob(data) for data in images]
    # ignore_result: the job store holds the outcome; a Celery result would make the sender
    # subscribe to a result channel per task, a subscription nobody ever ends.
    return job_id, celery.signature(EMBED_TASK, kwargs={"job_id": job_id, "tenant": tenant, "blob_keys": blob_keys},
                                    task_id=job_id, ignore_result=True)


def enqueue_embed(celery: Celery, jobs: JobStore, tenant: str, images: list[bytes], **options) -> str:
    """Store the images, create the job, send the task; returns the job id (= the task id)."""
    job_id, signature = embed_signature(celery, jobs, tenant, images)
    signature.apply_async(**options)
    return job_id


def generate_signature(celery: Celery, jobs: JobStore, tenant: str, payload: dict) -> tuple[str, Signature]:
    """Create the job and the task signature (to send alone or chain after an embed)."""
    job_id = jobs.create("generate", tenant)
    # ignore_result: the outcome lives in the job store (see embed_signature).
    return job_id, celery.signature(GENERATE_TASK, kwargs={"job_id": job_id, "tenant": tenant, "payload": payload},
                                    task_id=job_id, ignore_result=True)


def enqueue_generate(celery: Celery, jobs: JobStore, tenant: str, payload: dict) -> str:
    """Create the job and send the task; returns the job id (= the task id)."""
    job_id, signature = generate_signature(celery, jobs, tenant, payload)
    signature.apply_async()
    return job_id

"""A test-only generate worker whose pipeline raises a non-vlmq exception for prompts that ask for it.

It stands for any bug or library error inside a task (the `tokenizers` TypeError a lone surrogate
once caused, say). The worker is the production generate worker (real pipeline, real
`vlmq.generate` task, heartbeat); only `GeneratePipeline.generate` is wrapped, and only prompts
holding `FAULT` reach the fault. It lives in tests/ and runs as

    python -m tests.support.faulty_worker --model PATH
"""

from __future__ import annotations

import argparse

from generator_service.tasks import register_generate_task
from generator_service.worker import build_pipeline
from shared.config.settings import get_settings
from shared.queue.celery_app import GENERATE_QUEUE, create_celery_app
from shared.queue.worker import run_celery_worker

FAULT = "FAULT"
FAULT_MESSAGE = "TextInputSequence must be str (secret prompt detail)"  # must not reach the client


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--model", required=True)
    args = parser.parse_args()
    settings = get_settings()
    pipeline = build_pipeline(settings, args.model, "cpu")
    generate = pipeline.generate

    def faulty_generate(tenant: str, payload: dict, *args, **kwargs) -> dict:
        if FAULT in payload.get("prompt", ""):
            raise TypeError(FAULT_MESSAGE)
        return generate(tenant, payload, *args, **kwargs)

    pipeline.generate = faulty_generate
    app = create_celery_app(settings)
    register_generate_task(app, lambda: pipeline)
    run_celery_worker(app, GENERATE_QUEUE, concurrency=2, device="cpu", model_path=args.model)


if __name__ == "__main__":
    main()

"""The `vlmq` command line: workers, APIs, the local stack, bulk captioning, demo checkpoints."""

from __future__ import annotations

import argparse
import logging
import os
import subprocess
import sys

from shared.settings import get_settings

WORKER_KINDS = ("embed", "generate")


def _split_devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("give at least one device, e.g. cpu or cuda:0,cuda:1")
    return devices


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker process per device; several devices → one child process each."""
    if len(args.device) > 1:
        children = [
            subprocess.Popen([sys.executable, "-m", "shared.cli", "worker", args.kind, "--model", args.model, "--device", device]
                             + (["--concurrency", str(args.concurrency)] if args.concurrency else []))
            for device in args.device
        ]
        from shared.processes import wait_all_or_stop

        return wait_all_or_stop(children)
    settings = get_settings()
    if args.kind == "embed":
        from embedder_service.worker import run
    else:
        from generator_service.worker import run
    run(settings, args.model, args.device[0], args.concurrency)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    import uvicorn

    factory = "embedder_service.api.app:create_app" if args.kind == "embed" else "generator_service.api.app:create_app"
    uvicorn.run(factory, factory=True, host=args.host, port=args.port, log_level=args.log_level)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from shared.demo_model import write_demo_model

    path = write_demo_model(args.path, args.family)
    print(f"wrote a tiny random-weight {args.family} checkpoint to {path}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve the embed or generate queue (one process per device)")
    worker.add_argument("kind", choices=WORKER_KINDS)
    worker.add_argument("--model", required=True, help="Hugging Face checkpoint folder")
    worker.add_argument("--device", type=_split_devices, default=["cpu"], help="cpu, cuda:N or a comma-separated list")
    worker.add_argument("--concurrency", type=int, default=None, help="jobs held at once (default: the batch size)")
    worker.set_defaults(func=cmd_worker)

    api = sub.add_parser("api", help="serve the embed or generate REST API")
    api.add_argument("kind", choices=WORKER_KINDS)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=None, help="default 8001 (embed) or 8002 (generate)")
    api.add_argument("--log-level", default="info")
    api.set_defaults(func=cmd_api)

    demo = sub.add_parser("demo-model", help="write a tiny random-weight checkpoint (no download)")
    demo.add_argument("path")
    demo.add_argument("--family", default="llava", choices=["llava"])
    demo.set_defaults(func=cmd_demo_model)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    if getattr(args, "kind", None) and getattr(args, "port", "unset") is None:
        args.port = 8001 if args.kind == "embed" else 8002
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())

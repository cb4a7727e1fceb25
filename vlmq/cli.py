"""The `vlmq` command line: workers, APIs, the local stack, bulk captioning, demo checkpoints."""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

from shared.config.settings import get_settings
from vlmq.caption.outputs import FORMATS as OUTPUT_FORMATS

WORKER_KINDS = ("embed", "generate")
MODEL_HELP = ("Hugging Face checkpoint folder, a Hub name org/name[@revision] (fetched to the Hugging Face cache; "
              "HF_TOKEN, HF_HUB_OFFLINE honoured), or demo[:FAMILY] for the tiny demo checkpoint (written once to the cache)")
DEMO_CACHE = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "vlmq"


def resolve_model_path(text: str) -> str:
    """A checkpoint folder; `demo` / `demo:FAMILY`: the demo checkpoint, written once to the cache; or a Hugging
    Face Hub name `org/name[@revision]`: its snapshot in the Hugging Face cache, fetched if missing."""
    name, _, family = text.partition(":")
    if name != "demo" or Path(text).exists():
        from shared.config.errors import CheckpointError
        from shared.modeling.hub import resolve_checkpoint

        try:
            return resolve_checkpoint(text)
        except CheckpointError as exc:
            raise argparse.ArgumentTypeError(exc.message) from None
    from vlmq.demo_model import write_demo_model

    family = _demo_family(family or "llava")
    path = DEMO_CACHE / f"demo-{family}"
    if not path.is_dir():
        # Written aside and renamed, so concurrent first uses never see half a checkpoint.
        staging = write_demo_model(DEMO_CACHE / f".demo-{family}-{os.getpid()}", family)
        try:
            staging.rename(path)
        except OSError:  # another process won the race; its copy is identical
            shutil.rmtree(staging, ignore_errors=True)
    return str(path)


def _demo_family(text: str) -> str:
    """A family `vlmq demo-model` can write: checked against FAMILIES when parsed (importing it needs torch)."""
    from vlmq.demo_model import FAMILIES

    if text not in FAMILIES:
        raise argparse.ArgumentTypeError(f"no demo model for family {text!r}; choose one of {', '.join(FAMILIES)}")
    return text


def _split_devices(text: str) -> list[str]:
    devices = [d.strip() for d in text.split(",") if d.strip()]
    if not devices:
        raise argparse.ArgumentTypeError("give at least one device, e.g. cpu or cuda:0,cuda:1")
    return devices


def cmd_worker(args: argparse.Namespace) -> int:
    """One worker process per device; several devices → one child process each."""
    from shared.modeling.checkpoint import check_device

    try:
        for device in args.device:
            check_device(device)
    except ValueError as exc:  # before any model is loaded or child started
        print(f"vlmq worker: {exc}", file=sys.stderr)
        return 2
    if len(args.device) > 1:
        children = [
            subprocess.Popen([sys.executable, "-m", "vlmq", "worker", args.kind, "--model", args.model, "--device", device]
                             + (["--concurrency", str(args.concurrency)] if args.concurrency else []))
            for device in args.device
        ]
        from vlmq.processes import wait_all_or_stop

        return wait_all_or_stop(children, [f"worker {args.kind} on {device}" for device in args.device])
    settings = get_settings()
    if args.kind == "embed":
        from embedder_service.worker import run
    elif args.kind == "generate":
        from generator_service.worker import run
    else:
        from vlmq.combined_worker import run
    run(settings, args.model, args.device[0], args.concurrency)
    return 0


def cmd_api(args: argparse.Namespace) -> int:
    from shared.web.serve import serve

    if args.kind == "embed":
        from embedder_service.api.app import create_app
    else:
        from generator_service.api.app import create_app
    serve(create_app(), args.host, args.port, args.log_level)
    return 0


def cmd_demo_model(args: argparse.Namespace) -> int:
    from vlmq.demo_model import write_demo_model

    path = write_demo_model(args.path, args.family)
    print(f"wrote a tiny random-weight {args.family} checkpoint to {path}")
    return 0


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt


def _sigterm_like_ctrl_c() -> None:
    # SIGTERM would otherwise end the process at once, leaving Redis and the children behind.
    signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)


def cmd_up(args: argparse.Namespace) -> int:
    """Redis (unless VLMQ_BROKER_URL is set), both APIs and one worker of each, until Ctrl-C or SIGTERM."""
    import os

    from kombu.utils.url import maybe_sanitize_url

    from shared.modeling.checkpoint import check_device
    from vlmq.stack import ONE_WORKER, ApiPorts, LocalStack, StackError

    try:
        check_device(args.device)
    except ValueError as exc:
        print(f"vlmq up: {exc}", file=sys.stderr)
        return 2
    _sigterm_like_ctrl_c()
    apis = ApiPorts(args.host, args.embed_port, args.generate_port)
    workers = ONE_WORKER if args.one_worker else {}
    stack = LocalStack(args.model, **workers, device=args.device, apis=apis, broker_url=os.environ.get("VLMQ_BROKER_URL"),
                       data_dir=args.data_dir)
    try:
        stack.start()
    except KeyboardInterrupt:
        return 130  # start() has stopped what it started
    except StackError as exc:
        print(f"vlmq up: {exc}", file=sys.stderr)
        return 1
    # Celery's own masking: a password in the URL is printed as **.
    redis_url = stack.redis.url if stack.redis is not None else f"{stack.settings.broker_url} (VLMQ_BROKER_URL)"
    redis_line = f"  Redis          {maybe_sanitize_url(redis_url)}"
    print("vlmq is up:", f"  embedder API   {apis.url('embed')}  (docs: {apis.url('embed')}/docs)",
          f"  generator API  {apis.url('generate')}  (docs: {apis.url('generate')}/docs)", redis_line,
          "Ctrl-C stops everything.", sep="\n", flush=True)
    status = stack.wait()
    print("vlmq stopped.", flush=True)
    return status


def cmd_caption(args: argparse.Namespace) -> int:
    import kombu.exceptions

    from shared.config.errors import StoreUnavailable
    from vlmq.caption.command import CaptionError, RunChoice, StackChoice, Target, caption, dry_run
    from vlmq.caption.inputs import InputError, InputOptions
    from vlmq.caption.outputs import OutputError, guess_format
    from vlmq.caption.prompts import PromptError, parse_prompts
    from vlmq.caption.options import CaptionOptions
    from vlmq.stack import StackError

    _sigterm_like_ctrl_c()
    try:
        options = CaptionOptions(
            prompts=parse_prompts(args.prompt, args.prompts), max_tokens=args.max_tokens, temperature=args.temperature,
            top_p=args.top_p, top_k=args.top_k, seed=args.seed, ignore_eos=args.ignore_eos, stop=tuple(args.stop), max_in_flight=args.max_in_flight,
            tenant=args.tenant, timeout_s=args.timeout, limit=args.limit, max_failures=args.max_failures,
        )
        target = Target(args.input, args.out, args.out_format or guess_format(args.out),
                        InputOptions(args.image_column, args.id_column))
        run = RunChoice(args.run_id, args.client_id or RunChoice.client_id, args.claim_timeout)
        if args.dry_run:
            print(dry_run(target, options, run), flush=True)
            return 0
        stack = StackChoice(args.model, args.embed_workers, args.generate_workers, args.worker_timeout)
        summary = caption(target, options, stack, run, progress=not args.no_progress)
    except KeyboardInterrupt:  # while the stack was starting; an interrupted run returns its summary
        print("vlmq caption: interrupted", file=sys.stderr)
        return 130
    except (CaptionError, StackError, StoreUnavailable, kombu.exceptions.OperationalError, InputError, OutputError,
            PromptError) as exc:
        print(f"vlmq caption: error: {exc}", file=sys.stderr)
        return 2
    print(summary.line(), flush=True)
    if summary.interrupted:
        return 130
    return 1 if summary.failed or summary.stopped else 0


def cmd_caption_merge(args: argparse.Namespace) -> int:
    from vlmq.caption.merge import merge
    from vlmq.caption.outputs import OutputError, guess_format

    try:
        written, duplicates = merge(args.out, args.out_format or guess_format(args.out))
    except OutputError as exc:
        print(f"vlmq caption merge: error: {exc}", file=sys.stderr)
        return 2
    print(f"merged into {args.out}: {written} records written, {duplicates} duplicates passed over", flush=True)
    return 0


def _failure_limit(text: str):
    from vlmq.caption.options import FailureLimit

    try:
        return FailureLimit.parse(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="vlmq", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    worker = sub.add_parser("worker", help="serve the embed or generate queue, or both (`all`: one process whose "
                            "models take turns on the cores); one process per device")
    worker.add_argument("kind", choices=(*WORKER_KINDS, "all"))
    worker.add_argument("--model", required=True, type=resolve_model_path, help=MODEL_HELP)
    worker.add_argument("--device", type=_split_devices, default=None, help="cpu, cuda:N or a comma-separated list (default: VLMQ_DEVICE)")
    worker.add_argument("--concurrency", type=int, default=None, help="jobs held at once (default: the batch size)")
    worker.set_defaults(func=cmd_worker)

    api = sub.add_parser("api", help="serve the embed or generate REST API")
    api.add_argument("kind", choices=WORKER_KINDS)
    api.add_argument("--host", default="127.0.0.1")
    api.add_argument("--port", type=int, default=None, help="default 8001 (embed) or 8002 (generate)")
    api.add_argument("--log-level", default="info")
    api.set_defaults(func=cmd_api)

    up = sub.add_parser("up", help="the whole stack on this machine: Redis, both APIs, one worker of each")
    up.add_argument("--model", required=True, type=resolve_model_path, help=MODEL_HELP)
    up.add_argument("--host", default="127.0.0.1", help="interface the APIs listen on")
    up.add_argument("--embed-port", type=int, default=8001)
    up.add_argument("--generate-port", type=int, default=8002)
    up.add_argument("--device", default=None, help="device of both workers (default: VLMQ_DEVICE)")
    up.add_argument("--data-dir", default=None, help="keep the embedded Redis's append-only file here, across restarts "
                    "(default: a temporary folder)")
    up.add_argument("--one-worker", action="store_true", help="one `vlmq worker all` process instead of an embed and a "
                    "generate worker: each forward gets every core (faster first tokens on a small CPU machine), "
                    "and a decode step waits while an image is embedded")
    up.set_defaults(func=cmd_up)

    cap = sub.add_parser(
        "caption", help="caption images of a folder, glob, shards, Parquet or manifest (resumable; `caption merge` joins parts)",
        description="Uses the running stack when VLMQ_BROKER_URL is set, else starts a private one. "
                    "Images already in the output are skipped, so re-running continues an interrupted run. "
                    "`vlmq caption merge OUT` joins the parts of a --run-id run. "
                    "Exit status: 0 all done, 1 some images failed, 2 could not run, 130 interrupted.",
    )
    cap.add_argument("input", help="a folder (recursive; or of .tar shards or .parquet files), a glob or brace pattern "
                     "(quote it), an image, a .tar shard, a .parquet file, a .jsonl manifest, or a text file of paths")
    cap.add_argument("--model", type=resolve_model_path, help=MODEL_HELP + " (needed for the private stack)")
    cap.add_argument("--prompt", action="append", default=[], help="the instruction shown with each image; repeatable "
                     "as name=TEXT, each prompt answered from the same embedding")
    cap.add_argument("--prompts", default=None, help="a YAML file mapping prompt names to prompt texts")
    cap.add_argument("--out", default=None, help="output file (.jsonl, .parquet) or folder (webdataset shards), "
                     "added to; not needed for --out-format txt")
    cap.add_argument("--out-format", choices=OUTPUT_FORMATS, default=None, help="default: parquet for a .parquet --out, else jsonl")
    cap.add_argument("--image-column", default=None, help="Parquet: the image bytes or path column; manifest: the path field")
    cap.add_argument("--id-column", default=None, help="Parquet: a column carried into each record as id")
    cap.add_argument("--max-in-flight", type=_positive_int, default=32, help="images enqueued and not yet finished, at most")
    cap.add_argument("--limit", type=_positive_int, default=None, help="caption at most this many images in this run")
    cap.add_argument("--dry-run", action="store_true", help="count the images and those already done; caption nothing")
    cap.add_argument("--max-failures", type=_failure_limit, default=None, help="stop once more images than this failed: a count (50) or a share (10%%)")
    cap.add_argument("--max-tokens", type=_positive_int, default=32)
    cap.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    cap.add_argument("--top-p", type=float, default=None)
    cap.add_argument("--top-k", type=int, default=None)
    cap.add_argument("--seed", type=int, default=None)
    cap.add_argument("--stop", nargs="*", default=[], help="stop strings")
    cap.add_argument("--ignore-eos", action="store_true", help="every caption runs to --max-tokens (benchmarks)")
    cap.add_argument("--tenant", default="public", help="tenant the containers and jobs belong to")
    cap.add_argument("--timeout", type=float, default=600.0, help="seconds one image may take before it is failed")
    cap.add_argument("--run-id", default=None, help="share the run with every client given the same id (same Redis): "
                     "each input once, this client's output in OUT.parts/")
    cap.add_argument("--client-id", default=None, help="this client's name in a shared run (default: host-pid); "
                     "unique among running clients")
    cap.add_argument("--claim-timeout", type=float, default=120.0, help="seconds before a silent client's inputs "
                     "pass to another")
    cap.add_argument("--embed-workers", type=_positive_int, default=None, help="private stack only: run this many "
                     "embed worker processes (default: one `vlmq worker all` process serving both queues)")
    cap.add_argument("--generate-workers", type=_positive_int, default=None, help="private stack only: run this many "
                     "generate worker processes (default: see --embed-workers)")
    cap.add_argument("--worker-timeout", type=float, default=30.0, help="running stack: seconds to wait for workers to report in")
    cap.add_argument("--no-progress", action="store_true", help="no progress bar")
    cap.set_defaults(func=cmd_caption)

    demo = sub.add_parser("demo-model", help="write a tiny random-weight checkpoint (no download)")
    demo.add_argument("path")
    demo.add_argument("--family", default="llava", type=_demo_family,
                      help="a family of vlmq.demo_model.FAMILIES (default llava); a wrong one lists them")
    demo.set_defaults(func=cmd_demo_model)
    return parser


def build_merge_parser() -> argparse.ArgumentParser:
    """`vlmq caption merge`: parsed apart, as `caption` takes the input as its first word."""
    parser = argparse.ArgumentParser(prog="vlmq caption merge", description="join the parts (OUT.parts/) of a "
                                     "`vlmq caption --run-id` run into OUT, each image once")
    parser.add_argument("out", help="the --out the clients were given")
    parser.add_argument("--out-format", choices=("jsonl", "parquet"), default=None,
                        help="default: parquet for a .parquet OUT, else jsonl")
    parser.set_defaults(func=cmd_caption_merge)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    argv = sys.argv[1:] if argv is None else argv
    if argv[:2] == ["caption", "merge"]:
        args = build_merge_parser().parse_args(argv[2:])
        return args.func(args)
    args = build_parser().parse_args(argv)
    if getattr(args, "device", "unset") is None:
        device = get_settings().device
        args.device = _split_devices(device) if args.command == "worker" else device
    if getattr(args, "kind", None) and getattr(args, "port", "unset") is None:
        args.port = 8001 if args.kind == "embed" else 8002
    return args.func(args)


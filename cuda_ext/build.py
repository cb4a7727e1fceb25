"""Builds the C++/CUDA extensions in `gather/csrc/` and `decode/csrc/` on first use, cached across processes.

Two gather extensions, each registering a torch op `multimodal_embedding(ids, table, ranges,
rows, base) -> (out, error_tokens)` (`torch.ops.vlmq_gather_{cpu,cuda}`; see `cuda_ext.gather`):

- `gather_cuda`: the CUDA kernel (`multimodal_embedding_kernel.cu`, pure CUDA) and its torch
  binding; needs a CUDA build of torch and `nvcc`.
- `gather_cpu`: the same per-token code (`gather_index.h`, `gather_row.h`) in a loop over
  tokens; needs a C++ compiler only.

And the CPU decode step (`decode_cpu`, `torch.ops.vlmq_decode_cpu`: `decode_layer`,
`panel_linear`, `linear`; see `cuda_ext.decode`): AVX-512 and AVX2 kernels, the one the CPU has picked at
load time; a C++ compiler with OpenMP (it splits the work over torch's own threads).

All need ninja (torch's extension builder). Builds go to
`$VLMQ_EXTENSIONS_DIR/<library>-<digest>` (default: torch's extension root, honouring
`TORCH_EXTENSIONS_DIR`, then `vlmq/`), where the digest covers every file in the
extension's `csrc/` folder, the flags, the torch, CUDA and Python versions and
`TORCH_CUDA_ARCH_LIST`: an unchanged extension is built once per machine and then only
imported; a changed one gets a fresh folder. Ahead of time (e.g. in a GPU image, where no
compiler may be present later):

    TORCH_CUDA_ARCH_LIST="8.0;9.0" python -m cuda_ext.build
"""

from __future__ import annotations

import hashlib
import os
import shutil
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.utils import cpp_extension

from shared.config.settings import get_settings

ROOT = Path(__file__).resolve().parent
CFLAGS = ["-O3"]
CUDA_CFLAGS = ["-O3"]


@dataclass(frozen=True)
class Extension:
    """One library of torch ops, `torch.ops.<library>`, built from `sources` in `csrc` (which also holds their headers)."""

    what: str  # for messages
    library: str
    csrc: Path
    sources: tuple[str, ...]
    flags: tuple[str, ...] = ()  # for the host compiler and the linker
    cuda: bool = False


EXTENSIONS = {
    "gather_cpu": Extension("cpu gather", "vlmq_gather_cpu", ROOT / "gather" / "csrc", ("multimodal_embedding_cpu.cpp",)),
    "gather_cuda": Extension("cuda gather", "vlmq_gather_cuda", ROOT / "gather" / "csrc",
                             ("multimodal_embedding_cuda.cpp", "multimodal_embedding_kernel.cu"), cuda=True),
    # -fopenmp: at::parallel_for is inline OpenMP; the library then needs libgomp.so.1, which resolves
    # to the copy torch has already loaded, so it shares torch's thread pool.
    "decode_cpu": Extension("CPU decode", "vlmq_decode_cpu", ROOT / "decode" / "csrc",
                            ("decode_cpu.cpp", "decode_kernels_avx512.cpp", "decode_kernels_avx2.cpp"), flags=("-fopenmp",)),
}


class ExtensionUnavailable(RuntimeError):
    """An extension that this machine cannot provide; the torch reference still works."""


class ToolchainMissing(ExtensionUnavailable):
    """No compiler, ninja or CUDA build of torch: nothing to build with (not a bug in the sources)."""


class ExtensionBuildError(ExtensionUnavailable):
    """The toolchain is there but the build failed."""


Gather = Callable[..., tuple[torch.Tensor, torch.Tensor]]
_loaded: dict[str, Any | ExtensionUnavailable] = {}  # kind → its torch.ops namespace, or why it cannot be built


def cpu_gather() -> Gather:
    """The CPU extension's op, built on first call (raises ExtensionUnavailable, the same one every call, if it cannot be)."""
    return _extension("gather_cpu").multimodal_embedding


def cuda_gather() -> Gather:
    """The CUDA extension's op, built on first call (raises ExtensionUnavailable, the same one every call, if it cannot be)."""
    return _extension("gather_cuda").multimodal_embedding


def decode_cpu_ops() -> Any:
    """`torch.ops.vlmq_decode_cpu`, built on first call (raises ExtensionUnavailable, the same one every call, if it cannot be)."""
    return _extension("decode_cpu")


def missing_toolchain(kind: str) -> str | None:
    """Why extension `kind` (a key of EXTENSIONS) cannot be built here, or None when it can be tried."""
    if not cpp_extension.is_ninja_available():
        return "ninja not found (pip install ninja)"
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return f"C++ compiler {compiler!r} not found"
    if EXTENSIONS[kind].cuda:
        if torch.version.cuda is None:
            return f"torch {torch.__version__} is a CPU-only build"
        if cpp_extension.CUDA_HOME is None:
            return "nvcc not found (set CUDA_HOME or put nvcc on PATH)"
    return None


def build_directory(kind: str) -> Path:
    """Where `kind` is built: one folder per digest of everything that goes into the build."""
    extension = EXTENSIONS[kind]
    digest = hashlib.sha256()
    for path in sorted(extension.csrc.iterdir()):
        digest.update(path.name.encode() + b"\0" + path.read_bytes() + b"\0")
    context = [kind, *CFLAGS, *CUDA_CFLAGS, *extension.flags, torch.__version__, str(torch.version.cuda), sys.version,
               os.environ.get("TORCH_CUDA_ARCH_LIST", ""), os.environ.get("CXX", "")]
    digest.update("\0".join(context).encode())
    root = get_settings().extensions_dir or Path(
        os.environ.get("TORCH_EXTENSIONS_DIR") or cpp_extension.get_default_build_root(), "vlmq")
    return root / f"{extension.library}-{digest.hexdigest()[:16]}"


def _extension(kind: str) -> Any:
    if kind not in _loaded:
        try:
            _loaded[kind] = _build(kind)
        except ExtensionUnavailable as error:
            _loaded[kind] = error  # a failed build is not retried on every forward
    result = _loaded[kind]
    if isinstance(result, ExtensionUnavailable):
        raise result
    return result


def _build(kind: str) -> Any:
    extension = EXTENSIONS[kind]
    reason = missing_toolchain(kind)
    if reason is not None:
        raise ToolchainMissing(f"cannot build the {extension.what} extension: {reason}")
    directory = build_directory(kind)
    directory.mkdir(parents=True, exist_ok=True)
    try:
        # Ninja makes the build in an already built folder a no-op: then this only loads the library.
        cpp_extension.load(
            name=directory.name.replace("-", "_"),
            sources=[str(extension.csrc / source) for source in extension.sources],
            extra_include_paths=[str(extension.csrc)],
            extra_cflags=CFLAGS + list(extension.flags),
            extra_cuda_cflags=CUDA_CFLAGS,
            extra_ldflags=list(extension.flags),
            build_directory=str(directory),
            with_cuda=extension.cuda,
            is_python_module=False,
        )
    except (RuntimeError, OSError) as error:  # torch reports compiler errors as RuntimeError
        raise ExtensionBuildError(f"building the {extension.what} extension in {directory} failed: {error}") from error
    return getattr(torch.ops, extension.library)


def main() -> None:
    """Build every extension this machine can build; exit non-zero if one it could try failed."""
    failed = False
    for kind in EXTENSIONS:
        start = time.perf_counter()
        try:
            _extension(kind)
        except ToolchainMissing as error:
            print(f"{kind}: skipped, {error}")
            continue
        except ExtensionBuildError as error:
            print(f"{kind}: FAILED, {error}", file=sys.stderr)
            failed = True
            continue
        print(f"{kind}: {build_directory(kind)} ({time.perf_counter() - start:.1f} s)")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

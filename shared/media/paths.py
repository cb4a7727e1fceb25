"""Reading image files named by path, only under the configured roots."""

from __future__ import annotations

from pathlib import Path

from shared.config.errors import InvalidInput, TooLarge


def read_allowed_file(path: str, roots: list[Path], max_bytes: int) -> bytes:
    """The file's bytes, if its real location (symlinks and `..` resolved) lies under one of `roots`.

    Outside the roots the answer is 403 whether or not the path exists: the API host's files are
    not the caller's to probe.
    """
    if not roots:
        raise InvalidInput("reading images by path is disabled (set VLMQ_ALLOWED_PATH_ROOTS)", code="path_not_allowed", status=403)
    if "\0" in path:
        raise InvalidInput("the path holds a NUL byte, which no file name can")
    try:
        real = Path(path).resolve()  # the symlinks of the part that exists resolved; no error for a missing file
    except (OSError, RuntimeError):  # a symlink loop
        raise InvalidInput(f"path {path} is outside the allowed roots", code="path_not_allowed", status=403) from None
    if not any(real.is_relative_to(root.resolve()) for root in roots):
        raise InvalidInput(f"path {path} is outside the allowed roots", code="path_not_allowed", status=403)
    if not real.exists():
        raise InvalidInput(f"no such file: {path}", code="path_not_found", status=404)
    if not real.is_file():
        raise InvalidInput(f"{path} is not a regular file", code="path_not_found", status=404)
    size = real.stat().st_size
    if size > max_bytes:
        raise TooLarge(f"{path} is {size} bytes, over the limit of {max_bytes} (VLMQ_MAX_UPLOAD_BYTES)")
    return real.read_bytes()

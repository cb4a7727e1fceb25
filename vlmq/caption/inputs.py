"""What `vlmq caption` reads: image files, WebDataset tar shards, Parquet files and JSONL manifests, streamed.

An input spec names *units* — the pieces several clients split between them
(docs/DESIGN.md §10): one image file, one line of a path list or manifest, one
tar shard, one Parquet file. A unit yields *items*, one per image, each with
the fields that identify it in the output and a ``read()`` that loads its bytes
only when it is submitted, so memory never holds more than the images in
flight.
"""

from __future__ import annotations

import glob
import json
import os
import tarfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import braceexpand

IMAGE_EXTENSIONS = frozenset({".jpg", ".jpeg", ".png", ".webp", ".gif", ".bmp", ".tif", ".tiff"})
SHARD_EXTENSIONS = (".tar",)
PARQUET_EXTENSIONS = (".parquet",)
MANIFEST_EXTENSIONS = (".jsonl", ".ndjson")
GLOB_CHARS = frozenset("*?[")
# The fields that say which image a record is about, in every output: uid() is made of them.
IDENTITY_FIELDS = ("path", "shard", "key", "source", "row")


class InputError(ValueError):
    """An input that cannot be read as asked; the message names the file and the problem."""


def uid(fields: dict[str, Any]) -> str:
    """One string per image of a run, the same for an item and for the record written about it."""
    return json.dumps({name: fields[name] for name in IDENTITY_FIELDS if name in fields}, sort_keys=True)


@dataclass(frozen=True)
class Item:
    """One image: ``fields`` identify it (and carry an id or manifest fields), ``read`` loads its bytes."""

    unit: str
    fields: dict[str, Any]
    read: Callable[[], bytes]
    path: str | None = None  # the image file on disk, if it has one (`--out-format txt` writes beside it)

    @property
    def uid(self) -> str:
        return uid(self.fields)


@dataclass(frozen=True)
class Unit:
    """A piece of the input that one client claims as a whole: its name, and its items on demand."""

    name: str
    items: Callable[[], Iterator[Item]]
    kind: str  # "image", "shard", "parquet" or "manifest"
    listing: Callable[[], Iterator[Item]] | None = None  # the items without touching image data, if cheaper

    def list_items(self) -> Iterator[Item]:
        return (self.listing or self.items)()


@dataclass(frozen=True)
class InputOptions:
    image_column: str | None = None  # Parquet: the bytes or path column; manifest: the path field
    id_column: str | None = None  # Parquet: a column carried into every record as `id`


def is_image_path(path: str) -> bool:
    return os.path.splitext(path)[1].lower() in IMAGE_EXTENSIONS


def open_units(spec: str, options: InputOptions = InputOptions()) -> Iterator[Unit]:
    """The units ``spec`` names, lazily: a folder (images, recursive; or the tar shards or Parquet files in
    it), a glob or brace pattern, one file (image, shard, Parquet file, JSONL manifest, or a text file with
    one path per line)."""
    if "{" in spec and "}" in spec and not os.path.exists(spec):
        paths = list(braceexpand.braceexpand(spec))
        missing = [path for path in paths if not os.path.isfile(path)]
        if missing:
            raise InputError(f"{len(missing)} of the {len(paths)} files of {spec} do not exist, the first: {missing[0]}")
        for path in paths:
            yield from _file_units(path, options)
    elif os.path.isdir(spec):
        yield from _folder_units(spec, options)
    elif os.path.isfile(spec):
        yield from _file_units(spec, options)
    elif GLOB_CHARS & set(spec):
        for path in sorted(glob.iglob(spec, recursive=True)):
            if os.path.isfile(path) and _kind(path) != "list":
                yield from _file_units(path, options)
    else:
        raise InputError(f"input not found: {spec} (give a folder, a glob or brace pattern, an image, a .tar shard, "
                         "a .parquet file, a .jsonl manifest, or a text file of paths)")


def _kind(path: str) -> str:
    lower = path.lower()
    if is_image_path(lower):
        return "image"
    for kind, extensions in (("shard", SHARD_EXTENSIONS), ("parquet", PARQUET_EXTENSIONS), ("manifest", MANIFEST_EXTENSIONS)):
        if lower.endswith(extensions):
            return kind
    return "list"


def _folder_units(folder: str, options: InputOptions) -> Iterator[Unit]:
    """A folder of shards or of Parquet files (at its top level) is a dataset; any other is searched for images."""
    top = sorted(os.path.join(folder, name) for name in os.listdir(folder))
    for kind in ("shard", "parquet"):
        files = [path for path in top if os.path.isfile(path) and _kind(path) == kind]
        if files:
            for path in files:
                yield from _file_units(path, options)
            return
    for root, dirs, files in os.walk(folder):
        dirs.sort()
        for name in sorted(files):
            if is_image_path(name):
                yield _image_unit(os.path.join(root, name))


def _file_units(path: str, options: InputOptions) -> Iterator[Unit]:
    kind = _kind(path)
    path = os.path.abspath(path)
    if kind == "image":
        yield _image_unit(path)
    elif kind == "shard":
        yield Unit(path, lambda: _shard_items(path), "shard", lambda: _shard_items(path, data=False))
    elif kind == "parquet":
        from vlmq.caption.parquet_input import parquet_items

        yield Unit(path, lambda: parquet_items(path, options), "parquet", lambda: parquet_items(path, options, images=False))
    elif kind == "manifest":
        yield from _manifest_units(path, options)
    else:
        yield from _list_units(path)


def read_file(path: str) -> Callable[[], bytes]:
    def read() -> bytes:
        with open(path, "rb") as image:
            return image.read()

    return read


def _image_unit(path: str) -> Unit:
    path = os.path.abspath(path)
    item = Item(path, {"path": path}, read_file(path), path)
    return Unit(path, lambda: iter([item]), "image")


def _list_units(listing: str) -> Iterator[Unit]:
    """One path per line (relative ones from the current folder); blank lines and `#` comments skipped."""
    with open(listing, encoding="utf-8") as lines:
        for line in lines:
            line = line.strip()
            if line and not line.startswith("#"):
                yield _image_unit(line)


def _manifest_units(manifest: str, options: InputOptions) -> Iterator[Unit]:
    """A JSONL manifest: one object per line with the image's path (field ``--image-column``, default `path`;
    relative to the manifest's folder); every other field is carried into the record under `meta`."""
    field_name = options.image_column or "path"
    base = os.path.dirname(manifest)
    with open(manifest, encoding="utf-8") as lines:
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError as exc:
                raise InputError(f"{manifest}, line {number}: not a JSON object ({exc})") from None
            if not isinstance(entry, dict) or not isinstance(entry.get(field_name), str):
                raise InputError(f"{manifest}, line {number}: no string field {field_name!r} with the image's path "
                                 "(choose the field with --image-column)")
            path = os.path.join(base, entry.pop(field_name))
            fields = {"path": path, "source": manifest, "row": number} | ({"meta": entry} if entry else {})
            name = f"{manifest}#{number}"
            item = Item(name, fields, read_file(path), path)
            yield Unit(name, lambda item=item: iter([item]), "manifest")


def _shard_items(shard: str, *, data: bool = True) -> Iterator[Item]:
    """Each sample of a WebDataset shard: members sharing a key (the name up to the first dot of its base
    name), in order; its image is the first member with an image extension. A sample without one is skipped.
    The image is read as its sample is reached (one at a time); ``data=False`` lists the samples only."""
    try:
        tar = tarfile.open(shard, "r:")  # seekable: iterating skips over the data, extractfile reads it on demand
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{shard}: not a readable tar file ({exc})") from None
    with tar:
        key, image = None, None
        for member in _members(tar, shard):
            directory, base = os.path.split(member.name)
            member_key = os.path.join(directory, base.split(".", 1)[0])
            if member_key != key:
                if image is not None:
                    yield _sample(shard, key, tar, image, data)
                key, image = member_key, None
            if image is None and member.isfile() and is_image_path(member.name):
                image = member
        if image is not None:
            yield _sample(shard, key, tar, image, data)


def _members(tar: tarfile.TarFile, shard: str) -> Iterator[tarfile.TarInfo]:
    try:
        yield from tar
    except tarfile.TarError as exc:
        raise InputError(f"{shard}: the tar file is damaged ({exc})") from None


def _sample(shard: str, key: str, tar: tarfile.TarFile, member: tarfile.TarInfo, data: bool) -> Item:
    try:
        image = tar.extractfile(member).read() if data else b""
    except (tarfile.TarError, OSError) as exc:
        raise InputError(f"{shard}: the tar file is damaged at {member.name} ({exc})") from None
    return Item(shard, {"shard": shard, "key": key}, lambda: image)


def count_items(spec: str, options: InputOptions, skip: Callable[[Item], bool]) -> tuple[int, int]:
    """(items, items ``skip`` says are done), reading no image bytes: for the progress bar and --dry-run."""
    total = done = 0
    for unit in open_units(spec, options):
        for item in unit.list_items():
            total += 1
            done += skip(item)
    return total, done

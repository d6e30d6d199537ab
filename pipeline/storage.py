"""Object I/O for a lakehouse root: a local folder or ``s3://bucket[/prefix]``.

Every list, read, write, copy and delete of raw files, manifests and reports goes through here.
Keys are always relative to the root and use ``/``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import re
import shutil
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any, Protocol

from pipeline.errors import StorageError, UsageError
from pipeline.settings import load_settings


@dataclass(frozen=True)
class ObjectInfo:
    """One stored object: its key under the root, size in bytes and version (ETag or mtime)."""

    key: str
    size: int
    version: str


class Store(Protocol):
    """What the pipeline needs from a place that holds objects."""

    root: str

    def exists(self) -> bool:
        """Whether the root is there: the folder, or the bucket (a prefix needs no object)."""

    def uri(self, key: str) -> str:
        """The absolute location of ``key`` (a path or an ``s3://`` URL)."""

    def list(self, prefix: str) -> list[ObjectInfo]:
        """Every object under ``prefix``, sorted by key."""

    def stat(self, key: str) -> ObjectInfo | None:
        """The object at ``key``, or None when there is none."""

    def read_bytes(self, key: str) -> bytes:
        """The content of ``key``."""

    def read_range(self, key: str, start: int, length: int) -> bytes:
        """``length`` bytes of ``key`` from byte ``start`` (all of them there must be)."""

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        """Write ``key``; with ``if_absent``, only if it does not exist yet (returns False then)."""

    def local_path(
        self, key: str, version: str | None = None, size: int | None = None
    ) -> contextlib.AbstractContextManager[Path]:
        """A local file with the content of ``key`` for as long as the context lasts.

        With ``version`` and ``size`` (as the manifest has them), a copy must be of exactly that object
        (its ETag), else StorageError; a local file is checked by its reader instead (its digest).
        """

    def content_id(self, info: ObjectInfo) -> str:
        """What identifies the content of an object: ``sha256:<hex>`` of a file, ``etag:<ETag>`` on S3."""

    def swap(self, key: str, expected: bytes, data: bytes | None) -> bool:
        """Replace ``key`` by ``data`` (None: delete it) only if it holds ``expected`` now, atomically.

        Returns whether it did; two callers swapping the same content never both succeed.
        """

    def upload(self, path: Path, key: str) -> None:
        """Store the local file ``path`` as ``key``."""

    def move(self, src: str, dst: str, version: str | None = None) -> None:
        """Move ``src`` to ``dst`` (any size): ``dst`` is complete before ``src`` is gone.

        With ``version``, only if ``src`` is still that version (on S3 atomically, by If-Match).
        """

    def delete(self, key: str) -> None:
        """Delete ``key``; deleting a missing key is not an error."""


DOWNLOAD_PREFIX = "lakehouse-"
# What an S3 object the project writes is served as (S3 says binary/octet-stream otherwise, and a browser
# then downloads reports/<batch_id>.html instead of showing it).
CONTENT_TYPES = {".html": "text/html; charset=utf-8", ".json": "application/json"}
DOWNLOAD_PART = 64 << 20


def file_digest(path: Path, shown: str) -> str:
    """The SHA-256 of a file, read in large blocks (hashlib releases the GIL for them)."""
    import hashlib

    digest = hashlib.sha256()
    try:
        with path.open("rb") as handle:
            for block in iter(lambda: handle.read(8 << 20), b""):
                digest.update(block)
    except OSError as error:
        raise StorageError(f"cannot read {shown}: {error.strerror or error}") from error
    return digest.hexdigest()


def remove_stale_downloads() -> None:
    """Remove the download folders of this machine's runs that are gone (killed, so never cleaned)."""
    base = Path(tempfile.gettempdir())
    for folder in base.glob(f"{DOWNLOAD_PREFIX}*-*"):
        pid = folder.name[len(DOWNLOAD_PREFIX) :].split("-", 1)[0]
        if pid.isdigit() and not process_alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs on this machine."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # it exists, under another user
        return True
    return True


# S3's rules for a bucket's name: 3-63 lowercase letters, digits, dots and hyphens, a letter or digit at
# either end.
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def open_store(root: str) -> Store:
    """The store for ``root``: ``s3://bucket[/prefix]`` or a local folder."""
    if not root.strip():
        raise UsageError("the root is empty; give a local folder or s3://bucket[/prefix]")
    scheme, colon, rest = root.partition(":")
    if colon and scheme.lower() == "s3":
        if not rest.startswith("//"):
            raise UsageError(f"root {root!r} is not an S3 URL; write s3://bucket[/prefix]")
        bucket, _, prefix = rest[2:].partition("/")
        if not bucket:
            raise UsageError(f"root {root!r} names no bucket; write s3://bucket[/prefix]")
        if scheme != "s3" or not _BUCKET.fullmatch(bucket) or ".." in bucket:
            raise UsageError(
                f"root {root!r}: {bucket!r} is not a valid S3 bucket name (3-63 lowercase letters, "
                "digits, dots and hyphens); write s3://bucket[/prefix]"
            )
        return S3Store(bucket, prefix.strip("/"))
    if "://" in root:
        raise UsageError(f"root {root!r} is neither a local folder nor an s3:// URL")
    return LocalStore(Path(root))


class LocalStore:
    """A local folder laid out like the bucket."""

    def __init__(self, path: Path) -> None:
        self.path = path.expanduser().resolve()
        self.root = str(self.path)

    def exists(self) -> bool:
        return self.path.is_dir()

    def _file(self, key: str) -> Path:
        return self.path / key

    def uri(self, key: str) -> str:
        return str(self._file(key))

    def list(self, prefix: str) -> list[ObjectInfo]:
        base = self._file(prefix)
        if not base.is_dir():
            return []
        found = []
        for path in base.rglob("*"):
            if path.is_file():
                stat = path.stat()
                key = path.relative_to(self.path).as_posix()
                found.append(ObjectInfo(key, stat.st_size, str(stat.st_mtime_ns)))
        return sorted(found, key=lambda info: info.key)

    def stat(self, key: str) -> ObjectInfo | None:
        path = self._file(key)
        if not path.is_file():
            return None
        stat = path.stat()
        return ObjectInfo(key, stat.st_size, str(stat.st_mtime_ns))

    def read_bytes(self, key: str) -> bytes:
        try:
            return self._file(key).read_bytes()
        except OSError as error:
            raise StorageError(f"cannot read {self.uri(key)}: {error.strerror}") from error

    def read_range(self, key: str, start: int, length: int) -> bytes:
        try:
            with self._file(key).open("rb") as handle:
                handle.seek(start)
                data = handle.read(length)
        except OSError as error:
            raise StorageError(f"cannot read {self.uri(key)}: {error.strerror}") from error
        if len(data) != length:
            raise StorageError(f"cannot read {self.uri(key)}: {length} bytes from {start} are not there")
        return data

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            if if_absent:
                # link() fails if the target exists: an atomic create-if-absent on POSIX.
                try:
                    os.link(tmp, target)
                except FileExistsError:
                    return False
            else:
                os.replace(tmp, target)
            return True
        finally:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)

    @contextlib.contextmanager
    def local_path(self, key: str, version: str | None = None, size: int | None = None) -> Iterator[Path]:
        # The file itself: the reader checks the bytes it parses against the manifest's digest.
        path = self._file(key)
        if not path.is_file():
            raise StorageError(f"{path} does not exist")
        yield path

    def content_id(self, info: ObjectInfo) -> str:
        return "sha256:" + file_digest(self._file(info.key), self.uri(info.key))

    def swap(self, key: str, expected: bytes, data: bytes | None) -> bool:
        import fcntl

        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        # Compare-and-swap under an advisory lock of a side file: every swap of ``key`` takes it.
        try:
            with open(target.with_name(f".{target.name}.swap"), "a") as guard:
                fcntl.flock(guard, fcntl.LOCK_EX)
                try:
                    current = target.read_bytes()
                except FileNotFoundError:
                    return False
                if current != expected:
                    return False
                if data is None:
                    target.unlink()
                else:
                    self.write_bytes(key, data)
                return True
        except OSError as error:
            raise StorageError(f"cannot write {self.uri(key)}: {error.strerror or error}") from error

    def upload(self, path: Path, key: str) -> None:
        target = self._file(key)
        target.parent.mkdir(parents=True, exist_ok=True)
        if path.resolve() != target:
            shutil.copyfile(path, target)

    def move(self, src: str, dst: str, version: str | None = None) -> None:
        if version is not None:
            info = self.stat(src)
            if info is None or info.version != version:
                raise StorageError(f"cannot move {self.uri(src)}: it changed meanwhile")
        target = self._file(dst)
        target.parent.mkdir(parents=True, exist_ok=True)
        try:
            # A rename within one filesystem: atomic, and no byte is copied.
            os.replace(self._file(src), target)
        except OSError as error:
            if error.errno != errno.EXDEV:
                raise
            tmp = target.with_name(f".tmp-{target.name}")
            shutil.copyfile(self._file(src), tmp)
            os.replace(tmp, target)
            self.delete(src)

    def delete(self, key: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(key).unlink()


class S3Store:
    """A bucket (and optional prefix) on S3 or any S3-compatible server."""

    def __init__(self, bucket: str, prefix: str) -> None:
        import boto3

        settings = load_settings()
        self.bucket = bucket
        self.prefix = prefix
        self.root = f"s3://{bucket}/{prefix}".rstrip("/")
        self.client: Any = boto3.client(
            "s3",
            endpoint_url=settings.endpoint_url,
            region_name=settings.region,
            config=settings.boto_config(),
        )

    def exists(self) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as error:
            code = error.response.get("Error", {}).get("Code") if isinstance(error, ClientError) else None
            if code in ("404", "NoSuchBucket", "NotFound"):
                return False
            raise StorageError(f"cannot reach {self.uri('')}: {error}") from error
        return True

    def _key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _relative(self, full_key: str) -> str:
        return full_key[len(self.prefix) + 1 :] if self.prefix else full_key

    def uri(self, key: str) -> str:
        return f"s3://{self.bucket}/{self._key(key)}"

    def _call(self, action: str, key: str, fn: Any, **kwargs: Any) -> Any:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            return fn(**kwargs)
        except (BotoCoreError, ClientError) as error:
            raise StorageError(f"cannot {action} {self.uri(key)}: {error}") from error

    def list(self, prefix: str) -> list[ObjectInfo]:
        paginator = self.client.get_paginator("list_objects_v2")
        found = []
        pages = self._call(
            "list", prefix, lambda: list(paginator.paginate(Bucket=self.bucket, Prefix=self._key(prefix)))
        )
        for page in pages:
            for obj in page.get("Contents", []):
                found.append(ObjectInfo(self._relative(obj["Key"]), obj["Size"], obj["ETag"].strip('"')))
        return sorted(found, key=lambda info: info.key)

    def stat(self, key: str) -> ObjectInfo | None:
        from botocore.exceptions import ClientError

        try:
            head = self.client.head_object(Bucket=self.bucket, Key=self._key(key))
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return None
            raise StorageError(f"cannot read {self.uri(key)}: {error}") from error
        return ObjectInfo(key, head["ContentLength"], head["ETag"].strip('"'))

    def read_bytes(self, key: str) -> bytes:
        response = self._call("read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key))
        return bytes(response["Body"].read())

    def read_range(self, key: str, start: int, length: int) -> bytes:
        span = f"bytes={start}-{start + length - 1}"
        response = self._call(
            "read", key, self.client.get_object, Bucket=self.bucket, Key=self._key(key), Range=span
        )
        data = bytes(response["Body"].read())
        if len(data) != length:
            raise StorageError(f"cannot read {self.uri(key)}: {length} bytes from {start} are not there")
        return data

    def write_bytes(self, key: str, data: bytes, *, if_absent: bool = False) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        extra = {"IfNoneMatch": "*"} if if_absent else {}
        content_type = CONTENT_TYPES.get(PurePosixPath(key).suffix)
        if content_type:
            extra["ContentType"] = content_type
        try:
            self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **extra)
        except ClientError as error:
            if if_absent and error.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
            ):
                return False
            raise StorageError(f"cannot write {self.uri(key)}: {error}") from error
        except BotoCoreError as error:
            raise StorageError(f"cannot write {self.uri(key)}: {error}") from error
        return True

    @contextlib.contextmanager
    def local_path(self, key: str, version: str | None = None, size: int | None = None) -> Iterator[Path]:
        etag = version
        remove_stale_downloads()
        with tempfile.TemporaryDirectory(prefix=f"{DOWNLOAD_PREFIX}{os.getpid()}-") as tmp:
            path = Path(tmp) / Path(key).name
            if etag is None:
                self._call(
                    "download",
                    key,
                    self.client.download_file,
                    Bucket=self.bucket,
                    Key=self._key(key),
                    Filename=str(path),
                )
            else:
                self._download_exactly(key, etag, size, path)
            yield path

    def _download_exactly(self, key: str, etag: str, size: int | None, path: Path) -> None:
        """Download ``key`` in ranges, each one only if the object still has ``etag`` (If-Match).

        The managed download cannot be told which ETag to expect: a file replaced after its batch was
        snapshotted would be read as its new content.
        """
        from concurrent.futures import ThreadPoolExecutor

        from botocore.exceptions import ClientError

        info = self.stat(key)
        if info is None:
            raise StorageError(f"cannot read {self.uri(key)}: it does not exist")
        if info.version != etag or (size is not None and info.size != size):
            raise StorageError(
                f"{self.uri(key)} changed after its batch was snapshotted (ETag {etag} expected)"
            )
        ranges = [
            (start, min(start + DOWNLOAD_PART, info.size) - 1) for start in range(0, info.size, DOWNLOAD_PART)
        ]

        def fetch(span: tuple[int, int]) -> None:
            start, end = span
            try:
                body = self.client.get_object(
                    Bucket=self.bucket, Key=self._key(key), IfMatch=f'"{etag}"', Range=f"bytes={start}-{end}"
                )["Body"]
            except ClientError as error:
                if error.response.get("Error", {}).get("Code") in ("PreconditionFailed", "412"):
                    raise StorageError(
                        f"{self.uri(key)} changed after its batch was snapshotted (ETag {etag} expected)"
                    ) from error
                raise StorageError(f"cannot read {self.uri(key)}: {error}") from error
            with open(path, "r+b") as handle:
                handle.seek(start)
                for piece in iter(lambda: body.read(1 << 20), b""):
                    handle.write(piece)
                if handle.tell() != end + 1:
                    raise StorageError(f"cannot read {self.uri(key)}: the download ended early")

        with open(path, "wb") as handle:
            handle.truncate(info.size)
        try:
            with ThreadPoolExecutor(max_workers=8, thread_name_prefix="download") as pool:
                list(pool.map(fetch, ranges))
        except OSError as error:
            raise StorageError(
                f"cannot download {self.uri(key)} to {path}: {error.strerror or error}"
            ) from error

    def content_id(self, info: ObjectInfo) -> str:
        # A full-object checksum strong enough to tell contents apart is the content itself; an ETag
        # only is where S3 computes it from the bytes (not under SSE-KMS, nor for multipart uploads).
        head = self._call(
            "read",
            info.key,
            self.client.head_object,
            Bucket=self.bucket,
            Key=self._key(info.key),
            ChecksumMode="ENABLED",
        )
        if (
            head.get("ETag", "").strip('"') == info.version
            and head.get("ChecksumType", "FULL_OBJECT") == "FULL_OBJECT"
        ):
            for algorithm in ("SHA256", "CRC64NVME"):
                value = head.get(f"Checksum{algorithm}")
                if value and "-" not in value:
                    return f"{algorithm.lower()}:{value}"
        return f"etag:{info.version}"

    def swap(self, key: str, expected: bytes, data: bytes | None) -> bool:
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            current = self.client.get_object(Bucket=self.bucket, Key=self._key(key))
            body = current["Body"].read()
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                return False
            raise StorageError(f"cannot read {self.uri(key)}: {error}") from error
        except BotoCoreError as error:
            raise StorageError(f"cannot read {self.uri(key)}: {error}") from error
        if body != expected:
            return False
        condition = {"IfMatch": current["ETag"]}
        try:
            if data is None:
                self.client.delete_object(Bucket=self.bucket, Key=self._key(key), **condition)
            else:
                self.client.put_object(Bucket=self.bucket, Key=self._key(key), Body=data, **condition)
        except ClientError as error:
            if error.response.get("Error", {}).get("Code") in (
                "PreconditionFailed",
                "ConditionalRequestConflict",
                "412",
            ):
                return False
            raise StorageError(f"cannot write {self.uri(key)}: {error}") from error
        return True

    def upload(self, path: Path, key: str) -> None:
        self._call(
            "upload", key, self.client.upload_file, Filename=str(path), Bucket=self.bucket, Key=self._key(key)
        )

    def move(self, src: str, dst: str, version: str | None = None) -> None:
        # S3 has no rename: copy, check the copy, then delete. The managed copy switches to multipart
        # for objects over 5 GB, where CopyObject cannot go.
        # With ``version`` the copy and the delete hold only for that object (If-Match): an upload that
        # replaces it meanwhile is neither archived as this batch's nor deleted.
        source = self.stat(src)
        if source is None:
            raise StorageError(f"cannot move {self.uri(src)}: it does not exist")
        condition = f'"{version}"' if version else None
        self._call(
            "copy",
            src,
            self.client.copy,
            CopySource={"Bucket": self.bucket, "Key": self._key(src)},
            Bucket=self.bucket,
            Key=self._key(dst),
            ExtraArgs={"CopySourceIfMatch": condition} if condition else None,
        )
        copied = self.stat(dst)
        if copied is None or copied.size != source.size:
            raise StorageError(f"moving {self.uri(src)}: the copy at {self.uri(dst)} is incomplete")
        extra = {"IfMatch": condition} if condition else {}
        self._call("delete", src, self.client.delete_object, Bucket=self.bucket, Key=self._key(src), **extra)

    def delete(self, key: str) -> None:
        self._call("delete", key, self.client.delete_object, Bucket=self.bucket, Key=self._key(key))

"""Batch manifests: the exact raw files (key, size, version) that one batch processes."""

from __future__ import annotations

import json
import secrets
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, replace
from datetime import datetime

from pipeline.errors import LakehouseError, MissingDatasetError, UsageError
from pipeline.specs import TABLES
from pipeline.storage import ObjectInfo, Store

MANIFESTS = "manifests"
REPORTS = "reports"


@dataclass(frozen=True)
class ManifestFile:
    """One raw file of a batch, as it was when the batch was snapshotted.

    Attributes:
        key: its key under the root.
        size: its size in bytes.
        version: its mtime (local) or ETag (S3) then.
        content: what identifies its content (``Store.content_id``): ``sha256:<hex>`` or ``etag:<ETag>``.
        loaded_by: the succeeded batch that loaded this very content already (the file is skipped).
    """

    key: str
    size: int
    version: str
    content: str = ""
    loaded_by: str | None = None

    @property
    def history_key(self) -> str:
        """Where the load history notes that this content was loaded."""
        return loaded_key(self.size, self.content)


@dataclass(frozen=True)
class Manifest:
    """The files of one batch, per table, in key order."""

    batch_id: str
    created_at: str
    files: dict[str, list[ManifestFile]]

    @property
    def key(self) -> str:
        return manifest_key(self.batch_id)

    def to_json(self) -> bytes:
        return json.dumps(asdict(self), indent=2).encode()

    @classmethod
    def from_json(cls, data: bytes, source: str) -> Manifest:
        try:
            raw = json.loads(data)
            files = {table: [ManifestFile(**entry) for entry in raw["files"][table]] for table in TABLES}
            return cls(batch_id=raw["batch_id"], created_at=raw["created_at"], files=files)
        except (ValueError, KeyError, TypeError) as error:
            raise UsageError(f"{source} is not a batch manifest ({error})") from error


LOADED = f"{MANIFESTS}/_loaded"


def loaded_key(size: int, content: str) -> str:
    return f"{LOADED}/{size}-{content.replace(':', '-')}.json"


def manifest_key(batch_id: str) -> str:
    return f"{MANIFESTS}/{batch_id}.json"


def new_batch_id(now: datetime) -> str:
    """A sortable, unique batch id such as ``20261127T051500Z-3fa2c1``."""
    return f"{now:%Y%m%dT%H%M%SZ}-{secrets.token_hex(3)}"


def raw_prefix(table: str) -> str:
    return f"raw/{table}/"


def archived_key(table: str, batch_id: str, raw_key: str) -> str:
    """Where a raw file of a batch is archived (its path below ``raw/<table>/`` is kept)."""
    return f"archived/{table}/{batch_id}/{raw_key[len(raw_prefix(table)) :]}"


def is_csv(info: ObjectInfo) -> bool:
    name = info.key.rsplit("/", 1)[-1]
    return name.lower().endswith(".csv") and not name.startswith(".")


def raw_files(store: Store) -> dict[str, list[ObjectInfo]]:
    """The CSV files now in ``raw/``, by table; raise if a dataset has none."""
    found = {table: [info for info in store.list(raw_prefix(table)) if is_csv(info)] for table in TABLES}
    missing = [table for table, infos in found.items() if not infos]
    if missing:
        raise MissingDatasetError(
            f"no batch started: {', '.join(raw_prefix(t) for t in missing)} "
            f"{'has' if len(missing) == 1 else 'have'} no .csv file under {store.root}"
        )
    return found


def snapshot(store: Store, batch_id: str, now: datetime, *, force: bool = False) -> Manifest:
    """List the CSV files now in ``raw/``; raise if a dataset has none.

    Each file's content is identified (hashed locally, its ETag on S3); a content that a succeeded batch
    loaded already is marked ``loaded_by`` that batch, and skipped, unless ``force``.
    """
    found = raw_files(store)
    infos = [info for table in TABLES for info in found[table]]
    # Hashing releases the GIL: two files at a time.
    with ThreadPoolExecutor(max_workers=2) as pool:
        contents = dict(zip((info.key for info in infos), pool.map(store.content_id, infos)))
    # A file that changed while it was hashed is still being written: it is the next batch's.
    landing = {info.key for info in infos if store.stat(info.key) != info}
    found = {table: [info for info in infos if info.key not in landing] for table, infos in found.items()}
    missing = [table for table, infos in found.items() if not infos]
    if missing:
        raise MissingDatasetError(
            f"no batch started: {', '.join(raw_prefix(t) for t in missing)} "
            f"{'has' if len(missing) == 1 else 'have'} only files still being written under {store.root}"
        )
    files = {}
    for table in TABLES:
        entries = []
        for info in found[table]:
            entry = ManifestFile(info.key, info.size, info.version, contents[info.key])
            if not force:
                entry = replace(entry, loaded_by=loaded_by(store, entry))
            entries.append(entry)
        files[table] = entries
    return Manifest(batch_id=batch_id, created_at=now.isoformat(), files=files)


def loaded_by(store: Store, entry: ManifestFile) -> str | None:
    """The succeeded batch that loaded the content of ``entry`` (None: never loaded)."""
    if store.stat(entry.history_key) is None:
        return None
    try:
        return str(json.loads(store.read_bytes(entry.history_key))["batch_id"])
    except (ValueError, KeyError, TypeError, LakehouseError):
        return None


def record_loaded(store: Store, manifest: Manifest, now: datetime) -> None:
    """Note in the load history that every file this batch processed is loaded (its batch succeeded)."""
    for entries in manifest.files.values():
        for entry in entries:
            if entry.loaded_by is not None or not entry.content:
                continue
            note = {
                "batch_id": manifest.batch_id,
                "key": entry.key,
                "size": entry.size,
                "content": entry.content,
            }
            note["loaded_at"] = now.isoformat()
            store.write_bytes(entry.history_key, json.dumps(note, indent=2).encode())


def forget_loaded(store: Store, manifest: Manifest) -> int:
    """Remove the load history notes of ``manifest``'s batch; the number removed."""
    removed = 0
    for entries in manifest.files.values():
        for entry in entries:
            if entry.content and loaded_by(store, entry) == manifest.batch_id:
                store.delete(entry.history_key)
                removed += 1
    return removed


def same_content(store: Store, entry: ManifestFile, key: str | None = None) -> bool:
    """Whether the object at ``key`` (default: the entry's own) still holds the entry's content.

    A new mtime alone (a file touched, copied back) is no change: the content decides.
    """
    info = store.stat(key or entry.key)
    if info is None or info.size != entry.size:
        return False
    if info.version == entry.version or not entry.content:
        return info.version == entry.version
    return store.content_id(info) == entry.content


def read_manifest(store: Store, reference: str) -> Manifest:
    """Load a manifest given as a key under the root, a full URI/path inside the root, or a batch id."""
    key = reference
    root_uri = store.uri("")
    if reference.startswith(root_uri):
        key = reference[len(root_uri) :].lstrip("/")
    elif not reference.endswith(".json"):
        key = manifest_key(reference)
    if store.stat(key) is None:
        raise UsageError(f"no manifest at {store.uri(key)}")
    return Manifest.from_json(store.read_bytes(key), store.uri(key))


def unfinished_manifests(store: Store) -> list[Manifest]:
    """Manifests of batches that have no final report yet, oldest first."""
    finished = {info.key.rsplit("/", 1)[-1] for info in store.list(f"{REPORTS}/")}
    pending = [
        info.key
        for info in store.list(f"{MANIFESTS}/")
        if info.key.endswith(".json")
        and "/" not in info.key[len(MANIFESTS) + 1 :]
        and not info.key.rsplit("/", 1)[-1].startswith("_")
        and info.key.rsplit("/", 1)[-1] not in finished
    ]
    manifests = [Manifest.from_json(store.read_bytes(key), store.uri(key)) for key in pending]
    return sorted(manifests, key=lambda manifest: manifest.created_at)

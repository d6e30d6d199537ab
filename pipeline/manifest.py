"""Batch manifests: the exact raw files (key, size, version) that one batch processes."""

from __future__ import annotations

import json
import secrets
from dataclasses import asdict, dataclass
from datetime import datetime

from pipeline.errors import MissingDatasetError, UsageError
from pipeline.specs import TABLES
from pipeline.storage import ObjectInfo, Store

MANIFESTS = "manifests"
REPORTS = "reports"


@dataclass(frozen=True)
class ManifestFile:
    """One raw file of a batch, as it was when the batch was snapshotted."""

    key: str
    size: int
    version: str


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


def snapshot(store: Store, batch_id: str, now: datetime) -> Manifest:
    """List the CSV files now in ``raw/``; raise if a dataset has none."""
    files = {
        table: [
            ManifestFile(info.key, info.size, info.version)
            for info in store.list(raw_prefix(table))
            if is_csv(info)
        ]
        for table in TABLES
    }
    missing = [table for table, found in files.items() if not found]
    if missing:
        raise MissingDatasetError(
            f"no batch started: {', '.join(raw_prefix(t) for t in missing)} "
            f"{'has' if len(missing) == 1 else 'have'} no .csv file under {store.root}"
        )
    return Manifest(batch_id=batch_id, created_at=now.isoformat(), files=files)


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
        and not info.key.rsplit("/", 1)[-1].startswith("_")
        and info.key.rsplit("/", 1)[-1] not in finished
    ]
    manifests = [Manifest.from_json(store.read_bytes(key), store.uri(key)) for key in pending]
    return sorted(manifests, key=lambda manifest: manifest.created_at)

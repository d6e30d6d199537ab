"""Archiving a finished batch: exactly its manifest's files, from raw/ to archived/<table>/<batch_id>/.

No polars or deltalake on this module's import path: the archive Lambda imports it.
"""

from __future__ import annotations

from typing import Callable

from pipeline.errors import InputFileError
from pipeline.manifest import Manifest, archived_key, same_content
from pipeline.storage import Store


def _quiet(_: str) -> None:
    return None


def archive_batch(store: Store, manifest: Manifest, *, progress: Callable[[str], None] = _quiet) -> int:
    """Move exactly the manifest's files from ``raw/`` to ``archived/<table>/<batch_id>/``.

    Each file is moved (on S3: copied, checked, deleted); a file moved by an earlier attempt is fine.
    Returns the number of files now archived.
    """
    moved = 0
    for table, entries in manifest.files.items():
        for entry in entries:
            target = archived_key(table, manifest.batch_id, entry.key)
            source = store.stat(entry.key)
            earlier = store.stat(target)
            if earlier is not None and earlier.size == entry.size:
                # An earlier attempt copied it. What raw/ holds under that name now is either the rest
                # of that move (deleted here) or a newer upload: the next batch's, left alone.
                if source is not None and same_content(store, entry):
                    store.delete(entry.key)
                moved += 1
                continue
            if source is None:
                raise InputFileError(
                    f"cannot archive {store.uri(entry.key)}: it is gone and was never archived"
                )
            if not same_content(store, entry):
                raise InputFileError(
                    f"{store.uri(entry.key)} changed after batch {manifest.batch_id} was snapshotted; "
                    "it was not archived, since the batch did not process this content"
                )
            progress(f"archiving {entry.key}")
            store.move(entry.key, target, version=source.version)
            archived = store.stat(target)
            if archived is None or archived.size != source.size:
                raise InputFileError(f"archiving {store.uri(entry.key)}: {store.uri(target)} is incomplete")
            moved += 1
    return moved


def restore_batch(store: Store, manifest: Manifest) -> list[str]:
    """Move a batch's archived files back to ``raw/`` (for an abandoned batch): the keys they have now.

    A file whose raw key is taken by another upload comes back beside it, the batch id in its name.
    """
    restored = []
    for table, entries in manifest.files.items():
        for entry in entries:
            archived = archived_key(table, manifest.batch_id, entry.key)
            if store.stat(archived) is None:
                continue
            key = entry.key
            if store.stat(key) is not None:
                stem, dot, suffix = key.rpartition(".")
                key = f"{stem}.{manifest.batch_id}{dot}{suffix}"
            store.move(archived, key)
            restored.append(key)
    return restored

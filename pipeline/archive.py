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
            if source is None:
                if store.stat(target) is None:
                    raise InputFileError(
                        f"cannot archive {store.uri(entry.key)}: it is gone and was never archived"
                    )
                moved += 1
                continue
            if not same_content(store, entry):
                raise InputFileError(
                    f"{store.uri(entry.key)} changed after batch {manifest.batch_id} was snapshotted; "
                    "it was not archived, since the batch did not process this content"
                )
            progress(f"archiving {entry.key}")
            store.move(entry.key, target)
            archived = store.stat(target)
            if archived is None or archived.size != source.size:
                raise InputFileError(f"archiving {store.uri(entry.key)}: {store.uri(target)} is incomplete")
            moved += 1
    return moved

"""Committed units of work, so a run that died resumes where it stopped, on any runner.

A unit of work (a read task: a file or one Parquet row group) commits its whole result under a
checkpoint directory: its rows as a Parquet file, its dead letters as JSON lines, then a marker
holding its counts. Each file is written to a temporary name and renamed into place; the marker is
written last, so a unit is committed exactly when its marker exists, whatever happened before. A rerun
lists the markers first and skips those units; a unit that had written some files but no marker is
simply done again (same input, same bytes). Nothing here depends on a runner's own checkpointing:
the directory is plain files on a local disk or ``gs://``, read and written with Beam FileSystems.

The directory is scoped by ``checkpoint_scope``: a hash of the run key, the parameters and the
inputs' sizes and modification times, so a rerun with other inputs or options never reuses results
it should not. After a successful run the caller removes it (``clear``).
"""
import dataclasses
import hashlib
import json
import uuid

import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

from transforms.dead_letters import DeadLetter

_MARKER = '.done.json'
_ROWS = '.rows.parquet'
_LETTERS = '.dead_letters.jsonl'


def checkpoint_scope(run_key: str, parameters: dict, patterns: list[str]) -> str:
    """A short hash naming what a unit's result depends on: run key, parameters, input files."""
    files = []
    for pattern in patterns:
        for result in FileSystems.match([pattern]):
            files += [(m.path, m.size_in_bytes, m.last_updated_in_seconds) for m in result.metadata_list]
    text = json.dumps({'run_key': run_key, 'parameters': parameters, 'files': sorted(files)},
                      sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def unit_id(*parts) -> str:
    """A stable file-name-safe id for a unit of work from what identifies it (e.g. a ReadTask)."""
    return hashlib.sha256(json.dumps([str(p) for p in parts]).encode()).hexdigest()[:24]


@dataclasses.dataclass(frozen=True)
class Committed:
    rows: pa.Table
    dead_letters: list[DeadLetter]
    counts: dict


class CheckpointStore:
    """The committed units under ``root`` (a directory, local or gs://)."""

    def __init__(self, root: str):
        self.root = root.rstrip('/')

    def _path(self, unit: str, suffix: str) -> str:
        return FileSystems.join(self.root, unit + suffix)

    def committed(self) -> set[str]:
        """Ids of the units whose marker exists."""
        pattern = FileSystems.join(self.root, '*' + _MARKER)
        found = FileSystems.match([pattern])[0].metadata_list
        return {FileSystems.split(m.path)[1][:-len(_MARKER)] for m in found}

    def _publish(self, write, final_path: str) -> None:
        temp_path = FileSystems.join(self.root, f'.tmp-{uuid.uuid4().hex}')
        with FileSystems.create(temp_path, compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            write(handle)
        FileSystems.rename([temp_path], [final_path])

    def commit(self, unit: str, rows: pa.Table, dead_letters: list[DeadLetter], counts: dict) -> None:
        """Commits one unit: rows, then dead letters, then the marker (the commit point)."""
        if FileSystems.get_filesystem(self.root).has_dirs() and not FileSystems.exists(self.root):
            try:
                FileSystems.mkdirs(self.root)
            except IOError:
                if not FileSystems.exists(self.root):  # not just another worker creating it first
                    raise
        self._publish(lambda handle: pq.write_table(rows, handle), self._path(unit, _ROWS))
        lines = ''.join(json.dumps(letter._asdict(), ensure_ascii=False, sort_keys=True) + '\n'
                        for letter in dead_letters)
        self._publish(lambda handle: handle.write(lines.encode('utf-8')), self._path(unit, _LETTERS))
        marker = json.dumps({'counts': counts}, sort_keys=True).encode()
        self._publish(lambda handle: handle.write(marker), self._path(unit, _MARKER))

    def load(self, unit: str) -> Committed:
        with FileSystems.open(self._path(unit, _MARKER), compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            counts = json.loads(handle.read())['counts']
        with FileSystems.open(self._path(unit, _ROWS), compression_type=CompressionTypes.UNCOMPRESSED) as handle, \
                pq.ParquetFile(handle) as parquet_file:  # closed here, not on an Arrow thread at exit
            rows = parquet_file.read()
        with FileSystems.open(self._path(unit, _LETTERS), compression_type=CompressionTypes.UNCOMPRESSED) as handle:
            letters = [DeadLetter(**json.loads(line)) for line in handle.read().decode('utf-8').splitlines() if line]
        return Committed(rows=rows, dead_letters=letters, counts=counts)

    def clear(self) -> None:
        """Removes the whole directory (after the run that used it succeeded)."""
        if FileSystems.get_filesystem(self.root).has_dirs():
            if FileSystems.exists(self.root):
                FileSystems.delete([self.root])
        else:
            FileSystems.delete([self.root + '/'])

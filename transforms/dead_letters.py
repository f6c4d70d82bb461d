"""Dead letters: records that could not be processed, kept where a person can read them.

Every step that rejects a record emits a ``DeadLetter`` (the original payload, the step, the error,
where it came from). ``WriteDeadLetters`` stamps the run id, counts them in Beam metrics (in total and
per step) and writes them as JSON lines. Nothing is logged per record: payloads may hold personal
data and belong in the dead-letter file only.
"""
import json
import typing

import apache_beam as beam
from apache_beam.metrics import Metrics

METRICS_NAMESPACE = 'hrbatch'
DEAD_LETTERS_COUNTER = 'dead_letters'


class DeadLetter(typing.NamedTuple):
    step: str      # stable label of the rejecting step, e.g. 'ReadCandidates'
    error: str     # why: names the field, the value and what is allowed
    payload: str   # the original record as JSON text, or the raw bytes/line decoded
    source: str    # where it came from, e.g. 'gs://bucket/candidates.parquet#row=41'; '' if unknown


def locator(path: str, row: int | None) -> str:
    """The ``source`` of a record: its file and, when known, its 0-based row number."""
    return path if row is None else f'{path}#row={row}'


def to_json_line(letter: DeadLetter, run_id: str) -> str:
    return json.dumps(
        {'run_id': run_id, 'step': letter.step, 'error': letter.error,
         'source': letter.source, 'payload': letter.payload},
        ensure_ascii=False, sort_keys=True)


class _CountAndFormatFn(beam.DoFn):
    def __init__(self, run_id: str):
        self._run_id = run_id
        self._total = Metrics.counter(METRICS_NAMESPACE, DEAD_LETTERS_COUNTER)

    def process(self, letter: DeadLetter):
        self._total.inc()
        Metrics.counter(METRICS_NAMESPACE, f'{DEAD_LETTERS_COUNTER}.{letter.step}').inc()
        yield to_json_line(letter, self._run_id)


class WriteDeadLetters(beam.PTransform):
    """Writes ``DeadLetter`` records as JSON lines under ``output_prefix``.

    Files are ``<output_prefix>-SSSSS-of-NNNNN.jsonl`` (Beam's text sink: written to a temporary place,
    then published). Lines are sorted nowhere: read them with any JSON-lines tool. Returns the
    PCollection of written file names.
    """

    def __init__(self, *, output_prefix: str, run_id: str):
        super().__init__()
        if not output_prefix:
            raise ValueError('output_prefix must be a non-empty path prefix, e.g. out/dead_letters/letters')
        if not run_id:
            raise ValueError('run_id must be a non-empty string')
        self._output_prefix = output_prefix
        self._run_id = run_id

    def expand(self, letters):
        return (
            letters
            | 'CountAndFormat' >> beam.ParDo(_CountAndFormatFn(self._run_id))
            | 'Write' >> beam.io.WriteToText(self._output_prefix, file_name_suffix='.jsonl'))

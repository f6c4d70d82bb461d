"""Matching: score every active candidate against every open job offer, keep the matches.

A match is a (candidate, offer) pair whose weighted score reaches the offer's ``minimum_match_score``
(see ``transforms.scoring`` for the formula); with ``--top_k`` only the K best of each offer are kept,
ranked. Every match carries its per-component scores and the weights used, so each score can be
explained to the candidate and to an auditor.

Guarantees: the full cross product is never materialised (candidates stream in bounded batches and
are scored ``--pair_budget`` pairs at a time against the offers, which are a side input). Writes are
idempotent: matches are upserted on (offer_id, candidate_id) into the SQL database and written as
Parquet files named by their partition, published only once complete, so running the pipeline twice
on the same input leaves exactly the same rows and files. Invalid or duplicate input records go to
the dead-letter files with the reason; every valid record is scored.

Locally (DirectRunner's engine)::

    hrbatch run matching --candidates data/candidates.parquet --offers data/offers.parquet \\
        --output out/ --top_k 100 --direct_num_workers 2 --direct_running_mode multi_processing

On Dataflow::

    hrbatch run matching --candidates gs://BUCKET/candidates/*.parquet --offers gs://BUCKET/offers.parquet \\
        --output gs://BUCKET/matching/2026-12-03 --database none --runner DataflowRunner \\
        --project PROJECT --region europe-west1 --temp_location gs://BUCKET/tmp
"""
import dataclasses
import datetime
import os
import sys
import typing
import uuid

import apache_beam as beam
import pyarrow.parquet as pq
from apache_beam.io.filesystems import FileSystems
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.options.pipeline_options import PipelineOptions

from pipelines import options as opts
from pipelines.runner import resolve_runner
from transforms import schemas
from transforms import scoring
from transforms.batching import BatchBySize
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import WriteDeadLetters
from transforms.deduplicate import DropDuplicateKeys
from transforms.errors import ConfigError
from transforms.keyed_write import WriteKeyed
from transforms.read import ReadRecords
from transforms.score_matches import ScoreMatches

NAME = 'matching'
_CANDIDATE_KEYS = schemas.CANDIDATES.project(schemas.CANDIDATES.key, name='candidate_keys')
# Ids are a few bytes each: big batches keep the pieces that cross the duplicate search's shuffle few.
_KEY_BATCH_ROWS = 65_536
OPTIONS = (
    opts.Option('candidates', 'Candidates file or glob (local or gs://): Parquet, Avro, CSV or JSONL.',
                required=True),
    opts.Option('offers', 'Job offers file or glob (local or gs://).', required=True),
    opts.Option('output', 'Output directory (local or gs://): matches/ (Parquet) and dead_letters/.',
                required=True),
    opts.Option('database', 'Where matches are upserted: sqlite:///PATH, postgresql://..., or "none". '
                'Default: sqlite:///OUTPUT/hrbatch.db for a local output, none for gs://.'),
    opts.Option('candidates_format', 'Format of --candidates when the extension does not tell.',
                choices=('parquet', 'avro', 'csv', 'jsonl')),
    opts.Option('offers_format', 'Format of --offers when the extension does not tell.',
                choices=('parquet', 'avro', 'csv', 'jsonl')),
    opts.Option('top_k', 'Keep only the K best matches of each offer (ranked). Default: every match.',
                type='int', min_value=1),
    opts.Option('weights', 'JSON object of component weights, e.g. {"required_skills": 0.5}; '
                f'components: {", ".join(schemas.SCORE_COMPONENTS)}. Missing ones keep their default.',
                type='json', default={}),
    opts.Option('max_distance_km', 'Distance at which the distance score reaches 0.', type='float',
                default=100.0, min_value=0.001),
    opts.Option('salary_tolerance', 'Share above the salary band maximum at which the salary score reaches 0.',
                type='float', default=0.25, min_value=0.001),
    opts.Option('batch_rows', 'Candidates per batch.', type='int', default=8192, min_value=1),
    opts.Option('batch_bytes', 'Maximum bytes of candidate data per batch.', type='int', default=64 << 20,
                min_value=1024),
    opts.Option('pair_budget', 'Candidate x offer pairs scored at once (bounds scoring memory).', type='int',
                default=scoring.DEFAULT_PAIR_BUDGET, min_value=1),
    opts.Option('partition_buckets', 'Number of Parquet partitions (hash buckets of offer_id).', type='int',
                default=16, min_value=1, max_value=100_000),
    opts.Option('run_id', 'Identifier of this run, stamped on dead letters. Default: generated.'),
)


@dataclasses.dataclass(frozen=True)
class MatchingConfig:
    candidates: str
    offers: str
    output: str
    database: str | None
    candidates_format: str | None
    offers_format: str | None
    scoring: scoring.ScoringConfig
    batch_rows: int
    batch_bytes: int
    pair_budget: int
    partition_buckets: int
    run_id: str

    @property
    def matches_dir(self) -> str:
        return FileSystems.join(self.output, 'matches')

    @property
    def dead_letters_prefix(self) -> str:
        return FileSystems.join(self.output, 'dead_letters', 'dead_letters')

    @classmethod
    def from_values(cls, values: dict) -> 'MatchingConfig':
        weights = values['weights']
        if not isinstance(weights, dict):
            raise ConfigError(f'--weights must be a JSON object such as {{"distance": 0.2}}, got {weights!r}')
        try:
            config = scoring.ScoringConfig.create(
                weights=weights, max_distance_km=values['max_distance_km'],
                salary_tolerance=values['salary_tolerance'], top_k=values['top_k'])
        except ValueError as err:
            raise ConfigError(f'--{err}') from None
        output = values['output']
        database = values['database']
        if database is None:
            database = None if output.startswith('gs://') else \
                'sqlite:///' + os.path.join(os.path.abspath(output), 'hrbatch.db')
        elif database.lower() == 'none':
            database = None
        elif not database.startswith(('sqlite:///', 'postgresql://')):
            raise ConfigError(f'--database={database!r}: must be sqlite:///PATH, postgresql://... or none')
        run_id = values['run_id'] or (
            f'{NAME}-{datetime.datetime.now(datetime.timezone.utc):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:8]}')
        return cls(candidates=values['candidates'], offers=values['offers'], output=output, database=database,
                   candidates_format=values['candidates_format'], offers_format=values['offers_format'],
                   scoring=config, batch_rows=values['batch_rows'], batch_bytes=values['batch_bytes'],
                   pair_budget=values['pair_budget'], partition_buckets=values['partition_buckets'], run_id=run_id)


class Outputs(typing.NamedTuple):
    matches: beam.PCollection       # RecordBatches in the schemas.MATCHES layout
    dead_letters: beam.PCollection  # DeadLetter records from every step


def build(pipeline: beam.Pipeline, config: MatchingConfig) -> Outputs:
    """Adds the matching graph to ``pipeline`` and returns its matches and dead letters."""
    def read(label, pattern, schema, file_format, batch_rows=config.batch_rows):
        return pipeline | label >> ReadRecords(file_pattern=pattern, schema=schema, file_format=file_format,
                                               batch_rows=batch_rows, step=label)

    offers_read = read('ReadOffers', config.offers, schemas.OFFERS, config.offers_format)
    offers = offers_read.records | 'DropDuplicateOffers' >> DropDuplicateKeys(
        schema=schemas.OFFERS, step='DropDuplicateOffers')
    candidates_read = read('ReadCandidates', config.candidates, schemas.CANDIDATES, config.candidates_format)
    # Duplicates are found on a second read of just the candidates' ids, so the full read streams
    # straight into scoring instead of being held until every id has been seen (memory stays flat).
    # The first occurrence of an id (by file, then row) is kept, even when it is itself rejected
    # for another reason: which copy is right is for a person to decide, from the dead letters.
    candidate_keys = read('ReadCandidateKeys', config.candidates, _CANDIDATE_KEYS, config.candidates_format,
                          batch_rows=_KEY_BATCH_ROWS)
    candidates = candidates_read.records | 'DropDuplicateCandidates' >> DropDuplicateKeys(
        schema=schemas.CANDIDATES, reference=candidate_keys.records, buckets=16, step='DropDuplicateCandidates')
    batches = candidates.records | 'BatchCandidates' >> BatchBySize(
        max_rows=config.batch_rows, max_bytes=config.batch_bytes, step='BatchCandidates')
    matches = batches.batches | 'ScoreMatches' >> ScoreMatches(
        offers=offers.records, config=config.scoring, pair_budget=config.pair_budget)

    matches | 'WriteParquet' >> WriteKeyed(schema=schemas.MATCHES, target=config.matches_dir,
                                           partition_by='offer_id', buckets=config.partition_buckets)
    if config.database:
        matches | 'WriteDatabase' >> WriteKeyed(schema=schemas.MATCHES, target=config.database, table='matches')

    dead_letters = (
        (offers_read.dead_letters, offers.dead_letters, candidates_read.dead_letters,
         candidates.dead_letters, batches.dead_letters)
        | 'FlattenDeadLetters' >> beam.Flatten())
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(output_prefix=config.dead_letters_prefix,
                                                          run_id=config.run_id)
    return Outputs(matches=matches, dead_letters=dead_letters)


def _counter(result, name: str, step: str | None = None) -> int:
    query = MetricsFilter().with_namespace(METRICS_NAMESPACE).with_name(name)
    if step:
        query = query.with_step(step)
    return sum(r.committed or 0 for r in result.metrics().query(query)['counters'])


def summarize(result, config: MatchingConfig) -> dict:
    """The figures of a finished run, from Beam metrics and the written output."""
    files = [m.path for m in FileSystems.match([FileSystems.join(config.matches_dir, '*', '*.parquet')])[0]
             .metadata_list]
    offers_matched = set()
    best = 0.0
    for path in files:
        with FileSystems.open(path) as handle, pq.ParquetFile(handle) as parquet_file:
            table = parquet_file.read(columns=['offer_id', 'score'])
        offers_matched.update(table.column('offer_id').to_pylist())
        if table.num_rows:
            best = max(best, float(max(table.column('score').to_pylist())))
    return {
        'run_id': config.run_id,
        'candidates_read': _counter(result, 'candidates_read', 'ReadCandidates'),
        'offers_read': _counter(result, 'offers_read', 'ReadOffers'),
        'pairs_scored': _counter(result, 'pairs_scored'),
        'matches_written': _counter(result, 'matches_parquet_rows'),
        'offers_with_matches': len(offers_matched),
        'best_score': round(best, 4),
        'dead_letters': _counter(result, 'dead_letters'),
        'matches_dir': config.matches_dir,
        'database': config.database,
        'dead_letters_prefix': config.dead_letters_prefix,
    }


def print_summary(summary: dict, out=None) -> None:
    out = out or sys.stdout
    print(f"Matching run {summary['run_id']} finished.", file=out)
    print(f"  candidates read      {summary['candidates_read']:>14,}", file=out)
    print(f"  offers read          {summary['offers_read']:>14,}", file=out)
    print(f"  pairs scored         {summary['pairs_scored']:>14,}", file=out)
    print(f"  matches written      {summary['matches_written']:>14,}"
          f"   ({summary['offers_with_matches']:,} offers with at least one match, best score "
          f"{summary['best_score']})", file=out)
    print(f"  dead letters         {summary['dead_letters']:>14,}", file=out)
    print(f"Matches (Parquet):     {summary['matches_dir']}/", file=out)
    if summary['database']:
        print(f"Matches (SQL):         {summary['database']}  table matches", file=out)
    print(f"Dead letters (JSONL):  {summary['dead_letters_prefix']}-*.jsonl", file=out)


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, runs the pipeline to completion and returns its summary."""
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')
    config = MatchingConfig.from_values(values)
    pipeline_options = PipelineOptions(beam_args)
    standard = pipeline_options.view_as(beam.options.pipeline_options.StandardOptions)
    standard.runner = resolve_runner(standard.runner)
    pipeline = beam.Pipeline(options=pipeline_options)
    build(pipeline, config)
    result = pipeline.run()
    result.wait_until_finish()
    summary = summarize(result, config)
    print_summary(summary)
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

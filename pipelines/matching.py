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

Runs are recorded in the run ledger and the audit trail (``pipelines.lifecycle``): a run key that
already succeeded is not run again, and a run that died resumes with ``--resume``: each candidate read
task commits its result under ``OUTPUT/.checkpoints/`` and is not redone, and the resumed run ends with
exactly the result of a clean run.

Locally (DirectRunner's engine)::

    hrbatch run matching --candidates data/candidates.parquet --offers data/offers.parquet \\
        --output out/ --top_k 100 --direct_num_workers 2 --direct_running_mode multi_processing

On Dataflow::

    hrbatch run matching --candidates gs://BUCKET/candidates/*.parquet --offers gs://BUCKET/offers.parquet \\
        --output gs://BUCKET/matching/2026-12-03 --database none --ledger postgresql://... \\
        --runner DataflowRunner \\
        --project PROJECT --region europe-west1 --temp_location gs://BUCKET/tmp
"""
import dataclasses
import logging
import sys
import typing

import apache_beam as beam
import pyarrow as pa
import pyarrow.parquet as pq
from apache_beam.metrics import Metrics
from apache_beam.io.filesystems import FileSystems

from pipelines import lifecycle
from pipelines import options as opts
from transforms import schemas
from transforms import scoring
from transforms.batching import Rebatcher
from transforms.batching import oversize_letter
from transforms.checkpoints import CheckpointStore
from transforms.checkpoints import unit_id
from transforms.dead_letters import METRICS_NAMESPACE
from transforms.dead_letters import DeadLetter
from transforms.dead_letters import WriteDeadLetters
from transforms.deduplicate import DropDuplicateKeys
from transforms.deduplicate import FindDuplicateKeys
from transforms.deduplicate import Losers
from transforms.errors import ConfigError
from transforms.keyed_write import WriteKeyed
from transforms.read import ReadRecords
from transforms.read import ReadTask
from transforms.read import plan_read_tasks
from transforms.read import read_records
from transforms.score_matches import MatchScorer
from transforms.score_matches import offer_index

NAME = 'matching'
_LOGGER = logging.getLogger(__name__)
_DEAD_LETTERS = 'dead_letters'
_MERGE_ROWS = 200_000
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
)
OPTIONS = OPTIONS + lifecycle.LIFECYCLE_OPTIONS
_DATA_CATEGORIES = ['candidates', 'job offers', 'matches']


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
    def from_values(cls, values: dict, *, run_id: str) -> 'MatchingConfig':
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
        database = lifecycle.database_target(values['database'], output)
        return cls(candidates=values['candidates'], offers=values['offers'], output=output, database=database,
                   candidates_format=values['candidates_format'], offers_format=values['offers_format'],
                   scoring=config, batch_rows=values['batch_rows'], batch_bytes=values['batch_bytes'],
                   pair_budget=values['pair_budget'], partition_buckets=values['partition_buckets'], run_id=run_id)


class Outputs(typing.NamedTuple):
    matches: beam.PCollection       # RecordBatches in the schemas.MATCHES layout
    dead_letters: beam.PCollection  # DeadLetter records from every step
    tasks: int                      # candidate read tasks (files or Parquet row groups)
    tasks_resumed: int              # of which committed by an earlier run of the same key, not redone


class _ScoreTaskFn(beam.DoFn):
    """Reads, de-duplicates, batches and scores one candidate read task, then commits its result.

    The task is the unit of resumption: its matches (with top-K, the exact top K per offer among the
    task's candidates) and its dead letters are committed together with its counts, and a rerun of
    the same run skips it. Each task gets its own scorer, so its result depends on its rows alone.
    """

    def __init__(self, config: MatchingConfig, file_format: str, store_root: str):
        self._config = config
        self._file_format = file_format
        self._store_root = store_root
        self._index = self._index_of = None
        self._losers = self._losers_of = None

    def setup(self):
        self._store = CheckpointStore(self._store_root)

    def process(self, task: ReadTask, offers, losers):
        if self._index_of is not offers:  # side inputs are one object per bundle: index them once
            self._index, self._index_of = offer_index(offers), offers
        if self._losers_of is not losers:
            self._losers, self._losers_of = Losers(losers), losers
        config = self._config
        letters, blocks = [], []
        counts = {'candidates_read': 0, 'candidates_rejected': 0, 'candidates_duplicates': 0, 'pairs_scored': 0}
        scorer = MatchScorer(self._index, config.scoring, config.pair_budget) if self._index else None
        rebatcher = Rebatcher(max_rows=config.batch_rows, max_bytes=config.batch_bytes)

        def score(outputs):
            for kind, batch in outputs:
                if kind == 'oversize':
                    letters.append(oversize_letter(batch, 'BatchCandidates', config.batch_bytes))
                elif scorer is not None:
                    blocks.extend(scorer.score(batch))

        for item in read_records(task, schema=schemas.CANDIDATES, file_format=self._file_format,
                                 batch_rows=config.batch_rows, step='ReadCandidates'):
            if isinstance(item, DeadLetter):
                letters.append(item)
                counts['candidates_rejected'] += 1
                continue
            counts['candidates_read'] += item.num_rows
            kept, duplicates = self._losers.drop(item, schemas.CANDIDATES, 'DropDuplicateCandidates')
            letters += duplicates
            counts['candidates_duplicates'] += len(duplicates)
            score(rebatcher.add(kept))
        score(rebatcher.flush())
        rows = scorer.result() if scorer is not None and config.scoring.top_k else None
        if rows is None:
            rows = pa.concat_batches(blocks) if blocks else scoring.empty_matches()
        counts['pairs_scored'] = scorer.pairs if scorer is not None else 0
        self._store.commit(unit_id(*task), pa.Table.from_batches([rows]), letters, counts)
        yield unit_id(*task)


class _LoadCommittedFn(beam.DoFn):
    """Once every task is committed (the side input), emits all their results: this run's and those a
    run that died had committed. With top-K, merges them into the exact top K per offer."""

    def __init__(self, config: MatchingConfig, store_root: str, units: list[str]):
        self._config = config
        self._store_root = store_root
        self._units = units

    def process(self, _, committed_now):
        store = CheckpointStore(self._store_root)
        top_k = self._config.scoring.top_k
        parts, merged_rows = [], 0
        for unit in self._units:
            result = store.load(unit)
            for name, value in result.counts.items():
                Metrics.counter(METRICS_NAMESPACE, name).inc(value)
            for letter in result.dead_letters:
                yield beam.pvalue.TaggedOutput(_DEAD_LETTERS, letter)
            for block in result.rows.to_batches():
                if top_k:
                    parts.append(block)
                    # Merge once the buffer has doubled since the last merge: few sorts, bounded memory.
                    if sum(p.num_rows for p in parts) > max(2 * merged_rows, _MERGE_ROWS):
                        parts = [scoring.merge_top_k(parts, top_k)]
                        merged_rows = parts[0].num_rows
                elif block.num_rows:
                    yield scoring.to_match_rows(block, self._config.scoring, ranked=False)
        if top_k and parts:
            merged = scoring.merge_top_k(parts, top_k)
            if merged.num_rows:
                yield scoring.to_match_rows(merged, self._config.scoring, ranked=True)


def build(pipeline: beam.Pipeline, config: MatchingConfig, store: CheckpointStore) -> Outputs:
    """Adds the matching graph to ``pipeline`` and returns its matches and dead letters.

    Candidate read tasks already committed in ``store`` (by a run that died) are not read again.
    """
    offers_read = pipeline | 'ReadOffers' >> ReadRecords(
        file_pattern=config.offers, schema=schemas.OFFERS, file_format=config.offers_format,
        batch_rows=config.batch_rows, step='ReadOffers')
    offers = offers_read.records | 'DropDuplicateOffers' >> DropDuplicateKeys(
        schema=schemas.OFFERS, step='DropDuplicateOffers')
    # Duplicate ids are found on a separate read of just the candidates' ids, so the full read
    # streams straight into scoring instead of being held until every id has been seen (memory
    # stays flat). The first occurrence of an id (by file, then row) is kept, even when it is itself
    # rejected for another reason: which copy is right is for a person to decide, from the dead letters.
    candidate_keys = pipeline | 'ReadCandidateKeys' >> ReadRecords(
        file_pattern=config.candidates, schema=_CANDIDATE_KEYS, file_format=config.candidates_format,
        batch_rows=_KEY_BATCH_ROWS, step='ReadCandidateKeys')
    losers = candidate_keys.records | 'FindDuplicateCandidates' >> FindDuplicateKeys(
        key=schemas.CANDIDATES.key, buckets=16, spill_dir=lifecycle.spill_dir(config.output, config.run_id))

    file_format, tasks = plan_read_tasks(config.candidates, schemas.CANDIDATES, config.candidates_format)
    units = [unit_id(*task) for task in tasks]
    done = store.committed()
    todo = [task for task, unit in zip(tasks, units) if unit not in done]
    _LOGGER.info('matching: %d of %d candidate read tasks already committed', len(tasks) - len(todo), len(tasks))
    committed_now = (
        pipeline
        | 'ListCandidateTasks' >> beam.Create(todo).with_output_types(ReadTask)
        | 'ScoreTasks' >> beam.ParDo(_ScoreTaskFn(config, file_format, store.root),
                                     offers=beam.pvalue.AsList(offers.records), losers=beam.pvalue.AsList(losers)))
    loaded = (
        pipeline
        | 'AfterAllTasks' >> beam.Impulse()
        | 'LoadCommitted' >> beam.ParDo(_LoadCommittedFn(config, store.root, units),
                                        committed_now=beam.pvalue.AsList(committed_now))
        .with_output_types(pa.RecordBatch).with_outputs(_DEAD_LETTERS, main='matches'))
    matches = loaded.matches

    matches | 'WriteParquet' >> WriteKeyed(schema=schemas.MATCHES, target=config.matches_dir,
                                           partition_by='offer_id', buckets=config.partition_buckets)
    if config.database:
        matches | 'WriteDatabase' >> WriteKeyed(schema=schemas.MATCHES, target=config.database, table='matches')

    dead_letters = (
        (offers_read.dead_letters, offers.dead_letters, loaded[_DEAD_LETTERS])
        | 'FlattenDeadLetters' >> beam.Flatten())
    dead_letters | 'WriteDeadLetters' >> WriteDeadLetters(output_prefix=config.dead_letters_prefix,
                                                          run_id=config.run_id)
    return Outputs(matches=matches, dead_letters=dead_letters, tasks=len(tasks), tasks_resumed=len(tasks) - len(todo))


def summarize(result, config: MatchingConfig, outputs: Outputs) -> dict:
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
        'candidates_read': lifecycle.counter(result, 'candidates_read'),
        'offers_read': lifecycle.counter(result, 'offers_read'),
        'pairs_scored': lifecycle.counter(result, 'pairs_scored'),
        'matches_written': lifecycle.counter(result, 'matches_parquet_rows'),
        'offers_with_matches': len(offers_matched),
        'best_score': round(best, 4),
        'dead_letters': lifecycle.counter(result, 'dead_letters'),
        'tasks': outputs.tasks,
        'tasks_resumed': outputs.tasks_resumed,
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
    if summary['tasks_resumed']:
        print(f"  resumed: {summary['tasks_resumed']} of {summary['tasks']} read tasks were committed by the run "
              "that died and were not redone", file=out)
    print(f"Matches (Parquet):     {summary['matches_dir']}/", file=out)
    if summary['database']:
        print(f"Matches (SQL):         {summary['database']}  table matches", file=out)
    print(f"Dead letters (JSONL):  {summary['dead_letters_prefix']}-*.jsonl", file=out)


def run(argv: list[str] | None = None) -> dict:
    """Parses ``argv``, runs the pipeline to completion under the run ledger, returns its summary.

    A run key that already succeeded is not run again: the summary then only holds ``skipped``. When
    the Beam options only describe the job (``--dry_run``, or ``--template_location`` as a Flex
    Template launcher passes), ``describe`` builds and submits the description, outside the ledger.
    """
    values, beam_args = opts.parse(OPTIONS, list(sys.argv[1:] if argv is None else argv), prog=f'hrbatch run {NAME}')

    def summarize_run(result, config, outputs):
        summary = summarize(result, config, outputs)
        counts = {k: summary[k] for k in ('candidates_read', 'offers_read', 'pairs_scored', 'matches_written',
                                          'offers_with_matches', 'dead_letters', 'tasks', 'tasks_resumed')}
        written = {'matches': config.matches_dir, 'database': config.database, 'dead_letters': config.dead_letters_prefix}
        return summary, lifecycle.Outcome(counts=counts, outputs=written, record_refs={
            'matches_dir': config.matches_dir, 'matches_written': summary['matches_written']})

    spec, summary = lifecycle.run_pipeline(
        NAME, values, beam_args, output=values['output'],
        make_config=lambda run_id: MatchingConfig.from_values(values, run_id=run_id), build=build,
        summarize=summarize_run, inputs=lambda config: [config.candidates, config.offers],
        data_categories=_DATA_CATEGORIES)
    if 'matches_written' not in summary:
        return summary
    print_summary(summary)
    print(lifecycle.ledger_line(spec))
    return summary


if __name__ == '__main__':
    from pipelines.cli import main_for
    sys.exit(main_for(NAME))

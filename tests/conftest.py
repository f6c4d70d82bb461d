"""Shared test fixtures.

Every test pipeline runs on the runner that really executes local batch pipelines
(``pipelines.runner.LOCAL_RUNNER``), never on Beam's DirectRunner, which first tries to download Prism.
"""
import pytest
from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.testing.test_pipeline import TestPipeline

from pipelines.runner import LOCAL_RUNNER


def make_test_pipeline(*extra_args: str) -> TestPipeline:
    """A TestPipeline on the pinned local runner; ``extra_args`` are more Beam flags."""
    options = PipelineOptions([f'--runner={LOCAL_RUNNER}', *extra_args])
    return TestPipeline(runner=LOCAL_RUNNER, options=options, blocking=True)


@pytest.fixture
def test_pipeline():
    """Use as ``with test_pipeline() as p:``; the pipeline runs when the block exits."""
    return make_test_pipeline


# Real services, started by the tests themselves.
pytest_plugins = ['tests.fixtures.postgres', 'tests.fixtures.gcs', 'tests.fixtures.beam_services']

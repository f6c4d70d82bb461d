"""Which Beam runner executes when the user asks for the DirectRunner (or names none).

Beam's ``DirectRunner`` first tries the Prism runner, whose binary it downloads at run time; offline
that fails and it falls back to the ``FnApiRunner``, which is what really executes batch pipelines
locally (it honours ``--direct_num_workers`` and ``--direct_running_mode``). hrbatch names that runner
directly, so local runs and tests never depend on a download and always run on the same engine.
"""
import os
import sys

from apache_beam.options.pipeline_options import PipelineOptions
from apache_beam.options.pipeline_options import StandardOptions

LOCAL_RUNNER = 'FnApiRunner'
_DIRECT_ALIASES = {None, '', 'direct', 'directrunner', 'switchingdirectrunner', 'fnapirunner', 'fnapi'}


def resolve_runner(requested: str | None) -> str:
    """The runner name to hand to Beam for the user's ``--runner`` value."""
    if requested is None or requested.lower() in _DIRECT_ALIASES:
        return LOCAL_RUNNER
    return requested


def worker_pool_env(environ=None) -> dict:
    """Environment for ``apache_beam.runners.worker.worker_pool_main`` (the EXTERNAL environment).

    The pool starts each SDK worker as a bare ``python`` found on PATH: this interpreter's directory
    goes first, or the workers start without Beam and hrbatch, never connect, and the job hangs until
    its gRPC deadline.
    """
    env = dict(os.environ if environ is None else environ)
    env['PATH'] = os.pathsep.join([os.path.dirname(sys.executable), env.get('PATH', '')])
    return env


def pipeline_options(beam_args: list[str]) -> PipelineOptions:
    """Beam options from the flags a pipeline did not claim, with the runner resolved."""
    options = PipelineOptions(beam_args)
    standard = options.view_as(StandardOptions)
    standard.runner = resolve_runner(standard.runner)
    return options

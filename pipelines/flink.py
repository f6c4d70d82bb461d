"""A local Apache Flink session cluster to run hrbatch pipelines on: ``hrbatch flink up|status|down``.

``up`` starts, each as its own process:
- a Flink standalone session cluster, a JobManager and a TaskManager (Flink's own
  ``bin/start-cluster.sh``, with a configuration written for this cluster: ports, task slots, and its
  logs and pid files in the state directory);
- Beam's Flink job server (``java -jar``), which turns a Beam pipeline into a Flink job;
- a Beam Python SDK worker pool (``apache_beam.runners.worker.worker_pool_main``), where the Flink
  tasks run the pipelines' Python code: the ``EXTERNAL`` environment, as in production where one pool
  runs beside each TaskManager. (``--environment_type=LOOPBACK`` runs that code in the submitting
  process instead, for trying things out; ``DOCKER`` needs a Docker engine on each TaskManager.)

then prints the Beam options that submit a pipeline to it, which ``beam_args`` also returns. ``down``
stops all three. Flink and the job server come from ``.ci/install_flink.sh`` (``.flink/``), or from
``$HRBATCH_FLINK_HOME`` and ``$HRBATCH_FLINK_JOB_SERVER_JAR``.
"""
import contextlib
import dataclasses
import glob
import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request

import yaml

from pipelines.runner import worker_pool_env
from transforms.errors import ConfigError

REPO = pathlib.Path(__file__).resolve().parent.parent
INSTALL_DIR = REPO / '.flink'
HOME_ENV = 'HRBATCH_FLINK_HOME'
JAR_ENV = 'HRBATCH_FLINK_JOB_SERVER_JAR'
STARTUP_TIMEOUT_S = 180.0
_STATE_FILE = 'cluster.json'


def flink_home() -> pathlib.Path:
    """FLINK_HOME: ``$HRBATCH_FLINK_HOME``, else the one ``.ci/install_flink.sh`` installed."""
    configured = os.environ.get(HOME_ENV)
    found = [configured] if configured else sorted(glob.glob(str(INSTALL_DIR / 'venv/lib/python3*/site-packages/pyflink')))
    if not found or not (pathlib.Path(found[0]) / 'bin' / 'start-cluster.sh').is_file():
        raise ConfigError(f'no Flink installation: run bash .ci/install_flink.sh, or set ${HOME_ENV} to a '
                          'FLINK_HOME (a directory with bin/start-cluster.sh)')
    return pathlib.Path(found[0])


def job_server_jar() -> pathlib.Path:
    configured = os.environ.get(JAR_ENV)
    found = [configured] if configured else sorted(glob.glob(str(INSTALL_DIR / 'beam-runners-flink-*-job-server-*.jar')))
    if not found or not pathlib.Path(found[0]).is_file():
        raise ConfigError(f'no Beam Flink job server jar: run bash .ci/install_flink.sh, or set ${JAR_ENV}')
    return pathlib.Path(found[0])


@dataclasses.dataclass(frozen=True)
class Cluster:
    """Where a cluster started by ``up`` listens, and the processes that ``down`` stops."""
    state_dir: str
    rest_port: int
    rpc_port: int
    job_port: int
    artifact_port: int
    expansion_port: int
    worker_port: int
    slots: int
    job_server_pid: int = 0
    worker_pool_pid: int = 0

    @property
    def rest_url(self) -> str:
        return f'http://localhost:{self.rest_port}'

    def beam_args(self) -> list[str]:
        """The Beam options that run a pipeline on this cluster, its Python code in the worker pool."""
        return ['--runner=FlinkRunner', f'--flink_master=localhost:{self.rest_port}',
                f'--job_endpoint=localhost:{self.job_port}', f'--parallelism={self.slots}',
                '--environment_type=EXTERNAL', f'--environment_config=localhost:{self.worker_port}']


def _listening(port: int) -> bool:
    with contextlib.suppress(OSError), socket.create_connection(('127.0.0.1', port), timeout=0.5):
        return True
    return False


def overview(rest_url: str) -> dict | None:
    """The JobManager's ``/overview`` (task managers, slots, jobs, version), or None if it is down."""
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # loopback: never via a proxy
    try:
        with opener.open(f'{rest_url}/overview', timeout=2) as response:
            return json.load(response)
    except (urllib.error.URLError, OSError, ValueError):
        return None


def _set(config: dict, dotted: str, value) -> None:
    """Sets ``a.b.c`` in Flink's nested config.yaml, replacing a flat ``a.b.c`` key if there is one."""
    config.pop(dotted, None)
    node = config
    *parents, leaf = dotted.split('.')
    for part in parents:
        node = node.setdefault(part, {})
    node[leaf] = value


def _write_conf(home: pathlib.Path, state: pathlib.Path, cluster: Cluster) -> pathlib.Path:
    conf_dir = state / 'conf'
    if conf_dir.exists():
        shutil.rmtree(conf_dir)
    shutil.copytree(home / 'conf', conf_dir)
    config_path = conf_dir / 'config.yaml'
    config = yaml.safe_load(config_path.read_text(encoding='utf-8')) or {}
    for key, value in {'rest.port': cluster.rest_port, 'rest.address': 'localhost',
                       'jobmanager.rpc.port': cluster.rpc_port,
                       'taskmanager.numberOfTaskSlots': cluster.slots,
                       'parallelism.default': cluster.slots,
                       # A Beam pipeline becomes one Flink job with many shuffles, and each batch
                       # shuffle reader asks for sort-shuffle.min-buffers network buffers (512 by
                       # default) at once: more than a small TaskManager has free ("Insufficient
                       # number of network buffers"). 64 each, in 256 MiB of network memory.
                       'taskmanager.memory.process.size': '2048m',
                       'taskmanager.memory.network.min': '256mb', 'taskmanager.memory.network.max': '256mb',
                       'taskmanager.network.sort-shuffle.min-buffers': 64,
                       'env.pid.dir': str(state), 'env.log.dir': str(state / 'log')}.items():
        _set(config, key, value)
    config_path.write_text(yaml.safe_dump(config, sort_keys=True), encoding='utf-8')
    return conf_dir


def _flink_env(home: pathlib.Path, state: pathlib.Path) -> dict:
    env = dict(os.environ)
    env.update(FLINK_HOME=str(home), FLINK_CONF_DIR=str(state / 'conf'), FLINK_LOG_DIR=str(state / 'log'),
               FLINK_PID_DIR=str(state))
    return env


def _wait(predicate, what: str, log: pathlib.Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return
        time.sleep(0.25)
    raise ConfigError(f'{what} did not start within {timeout_s:.0f} s; see {log}')


def _spawn(command: list[str], log: pathlib.Path, env=None) -> int:
    """Starts a detached process (its own session: it outlives ``hrbatch flink up``); returns its pid."""
    with open(log, 'ab') as out:
        return subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                env=env, start_new_session=True).pid


def load(state_dir) -> Cluster | None:
    path = pathlib.Path(state_dir) / _STATE_FILE
    return Cluster(**json.loads(path.read_text(encoding='utf-8'))) if path.is_file() else None


def up(state_dir, *, rest_port: int = 8081, rpc_port: int = 6123, job_port: int = 8099, artifact_port: int = 8098,
       expansion_port: int = 8097, worker_port: int = 50000, slots: int = 2,
       timeout_s: float = STARTUP_TIMEOUT_S) -> Cluster:
    """Starts the cluster, the job server and the worker pool; returns them once all three answer."""
    state = pathlib.Path(state_dir).resolve()
    if load(state) is not None:
        raise ConfigError(f'a cluster was already started from {state}: hrbatch flink down --state_dir {state} first')
    home, jar = flink_home(), job_server_jar()
    ports = {'--rest_port': rest_port, '--rpc_port': rpc_port, '--job_port': job_port,
             '--artifact_port': artifact_port, '--expansion_port': expansion_port, '--worker_port': worker_port}
    for flag, port in ports.items():
        if _listening(port):
            raise ConfigError(f'{flag}={port}: the port is already in use; choose another')
    (state / 'log').mkdir(parents=True, exist_ok=True)
    cluster = Cluster(str(state), rest_port, rpc_port, job_port, artifact_port, expansion_port, worker_port, slots)
    _write_conf(home, state, cluster)
    env = _flink_env(home, state)
    subprocess.run([str(home / 'bin' / 'start-cluster.sh')], env=env, check=True, stdout=subprocess.DEVNULL,
                   stdin=subprocess.DEVNULL)
    # Saved at once, so that down stops whatever did start even if the rest fails.
    (state / _STATE_FILE).write_text(json.dumps(dataclasses.asdict(cluster)), encoding='utf-8')
    try:
        _wait(lambda: (overview(cluster.rest_url) or {}).get('taskmanagers', 0) >= 1,
              f'the Flink cluster ({cluster.rest_url})', state / 'log', timeout_s)
        job_server_pid = _spawn(['java', '-jar', str(jar), f'--flink-master=localhost:{rest_port}',
                                 f'--job-port={job_port}', f'--artifact-port={artifact_port}',
                                 f'--expansion-port={expansion_port}', f'--artifacts-dir={state / "artifacts"}'],
                                state / 'log' / 'job-server.log')
        worker_pool_pid = _spawn([sys.executable, '-m', 'apache_beam.runners.worker.worker_pool_main',
                                  f'--service_port={worker_port}'], state / 'log' / 'worker-pool.log',
                                 env=worker_pool_env())
        cluster = dataclasses.replace(cluster, job_server_pid=job_server_pid, worker_pool_pid=worker_pool_pid)
        (state / _STATE_FILE).write_text(json.dumps(dataclasses.asdict(cluster)), encoding='utf-8')
        _wait(lambda: _listening(job_port), 'the Beam Flink job server', state / 'log' / 'job-server.log', timeout_s)
        _wait(lambda: _listening(worker_port), 'the Beam worker pool', state / 'log' / 'worker-pool.log', timeout_s)
    except BaseException:
        down(state)
        raise
    return cluster


def _stop_pid(pid: int, timeout_s: float = 15) -> None:
    if not pid:
        return
    with contextlib.suppress(ProcessLookupError):
        os.killpg(pid, signal.SIGTERM)  # its own session: the worker pool's workers go too
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            os.kill(pid, 0)
            with contextlib.suppress(ChildProcessError):
                if os.waitpid(pid, os.WNOHANG)[0]:
                    return
            time.sleep(0.1)
        os.killpg(pid, signal.SIGKILL)


def down(state_dir) -> bool:
    """Stops what ``up`` started from ``state_dir``; False if nothing was started there."""
    state = pathlib.Path(state_dir).resolve()
    cluster = load(state)
    if cluster is None:
        return False
    _stop_pid(cluster.job_server_pid)
    _stop_pid(cluster.worker_pool_pid)
    home = flink_home()
    subprocess.run([str(home / 'bin' / 'stop-cluster.sh')], env=_flink_env(home, state), check=False,
                   stdout=subprocess.DEVNULL, stdin=subprocess.DEVNULL)
    (state / _STATE_FILE).unlink()
    return True


def status(state_dir) -> dict:
    cluster = load(state_dir)
    if cluster is None:
        return {'up': False}
    flink = overview(cluster.rest_url)
    return {'up': bool(flink) and _listening(cluster.job_port) and _listening(cluster.worker_port),
            'flink': flink, 'rest_url': cluster.rest_url,
            'job_server': f'localhost:{cluster.job_port}' if _listening(cluster.job_port) else None,
            'worker_pool': f'localhost:{cluster.worker_port}' if _listening(cluster.worker_port) else None,
            'beam_args': cluster.beam_args()}


def main(argv: list[str], out=None) -> int:
    """``hrbatch flink up|status|down``."""
    from pipelines.options import ConfigErrorParser
    out = sys.stdout if out is None else out
    parser = ConfigErrorParser(prog='hrbatch flink', description='A local Flink cluster for hrbatch pipelines.')
    commands = parser.add_subparsers(dest='command', required=True)
    start = commands.add_parser('up', help='start a JobManager, a TaskManager, the job server and a worker pool')
    commands.add_parser('status', help='what is running, and the options that submit to it')
    commands.add_parser('down', help='stop everything up started')
    for sub in commands.choices.values():
        sub.add_argument('--state_dir', default=str(INSTALL_DIR / 'cluster'),
                         help='configuration, logs and pids of the cluster (default: .flink/cluster)')
    for name, default in (('rest_port', 8081), ('rpc_port', 6123), ('job_port', 8099), ('artifact_port', 8098),
                          ('expansion_port', 8097), ('worker_port', 50000), ('slots', 2)):
        start.add_argument(f'--{name}', type=int, default=default)
    args = parser.parse_args(argv)
    if args.command == 'up':
        options = {k: v for k, v in vars(args).items() if k not in ('command', 'state_dir')}
        cluster = up(args.state_dir, **options)
        print(f'Flink cluster up: {cluster.rest_url} (web UI), logs in {cluster.state_dir}/log', file=out)
        print('Run a pipeline on it with: ' + ' '.join(cluster.beam_args()), file=out)
        return 0
    if args.command == 'down':
        print('stopped' if down(args.state_dir) else f'nothing was started from {args.state_dir}', file=out)
        return 0
    report = status(args.state_dir)
    print(json.dumps(report, indent=2), file=out)
    return 0 if report['up'] else 1

"""Dataflow Flex Templates: each pipeline's ``metadata.json``, rendered from its declared options, and
the launch entry point that runs inside the template image.

``templates/<name>/metadata.json`` is generated, never edited by hand: ``render(name)`` turns the
pipeline's ``OPTIONS`` into the ``TemplateMetadata`` message that ``gcloud dataflow flex-template build
--metadata-file`` reads (one parameter per option, in declaration order, keys sorted, so the file only
changes when an option does). ``hrbatch template metadata`` rewrites every file;
tests/pipelines/test_templates.py fails when one is out of date.

``launch`` is what the Flex Template launcher runs (through ``templates/main.py``). The launcher calls
the program with every template parameter as ``--name=value`` plus Beam's own options (``--runner``,
``--project``, ``--region``, ``--template_location``, ...); the pipeline's own option parsing
(``pipelines.options``) then parses the strings strictly and rejects unknown keys, exactly as on the
command line. Which pipeline to run is baked into each template image as ``HRBATCH_PIPELINE`` (see
templates/Dockerfile), so a template can only ever start the pipeline its metadata describes.
"""
import json
import os
import pathlib
import shlex
import shutil
import subprocess
import sys

from pipelines import options as opts
from pipelines import registry
from transforms.errors import ConfigError

TEMPLATES_DIR = pathlib.Path(__file__).resolve().parent.parent / 'templates'
PIPELINE_ENV = 'HRBATCH_PIPELINE'
IMAGE_ENV = 'HRBATCH_SDK_CONTAINER_IMAGE'

# Anchored patterns the Dataflow service checks a parameter against before it starts the launcher.
# Each accepts a subset of what pipelines.options parses (tested), so a value the form accepts never
# fails at launch for its syntax; ranges and JSON are checked by the parser itself.
_BOOL_REGEX = '^(true|false)$'
_UNSIGNED_INT_REGEX = '^[0-9]+$'
_INT_REGEX = '^-?[0-9]+$'
_FLOAT_REGEX = r'^-?([0-9]+(\.[0-9]*)?|\.[0-9]+)([eE][-+]?[0-9]+)?$'
# ParameterType values of google.cloud.dataflow_v1beta3.ParameterMetadata: they pick the form widget.
_PARAM_TYPES = {'string': 'TEXT', 'json': 'TEXT', 'int': 'NUMBER', 'float': 'NUMBER', 'bool': 'BOOLEAN'}


def metadata_path(name: str) -> pathlib.Path:
    return TEMPLATES_DIR / name / 'metadata.json'


def _label(option: opts.Option) -> str:
    return option.name.replace('_', ' ').capitalize()


def parameter_text(option: opts.Option, value) -> str:
    """``value`` of ``option`` as the string a launcher passes, which ``option.parse`` reads back."""
    if option.type == 'bool':
        return 'true' if value else 'false'
    if option.type == 'json':
        return json.dumps(value, sort_keys=True, separators=(',', ':'))
    return str(value)


def _default_text(option: opts.Option) -> str | None:
    """The default as a launcher would pass it, so the form shows what the pipeline uses."""
    return None if option.default is None else parameter_text(option, option.default)


def _regexes(option: opts.Option) -> list[str]:
    if option.choices is not None:
        return ['^(' + '|'.join(option.choices) + ')$']
    if option.type == 'bool':
        return [_BOOL_REGEX]
    if option.type == 'int':
        non_negative = option.min_value is not None and option.min_value >= 0
        return [_UNSIGNED_INT_REGEX if non_negative else _INT_REGEX]
    if option.type == 'float':
        return [_FLOAT_REGEX]
    return []


def parameter(option: opts.Option) -> dict:
    """One ``ParameterMetadata`` (JSON field names) for ``option``."""
    default = _default_text(option)
    help_text = option.help + ('' if default is None else f' Default: {default}.')
    entry = {
        'name': option.name,
        'label': _label(option),
        'helpText': help_text,
        'isOptional': not option.required,
        'paramType': 'ENUM' if option.choices is not None else _PARAM_TYPES[option.type],
    }
    regexes = _regexes(option)
    if regexes:
        entry['regexes'] = regexes
    if option.choices is not None:
        entry['enumOptions'] = [{'value': choice} for choice in option.choices]
    if default is not None:
        entry['defaultValue'] = default
    return entry


def metadata(name: str) -> dict:
    """The ``TemplateMetadata`` of pipeline ``name``: its parameters in declaration order."""
    module = registry.load(name)
    summary = (module.__doc__ or name).strip().split('\n\n', 1)[0].replace('\n', ' ')
    return {
        'name': f'hrbatch {name}',
        'description': summary,
        'streaming': False,
        'parameters': [parameter(option) for option in module.OPTIONS],
    }


def render(name: str) -> str:
    """``metadata.json`` of pipeline ``name``, byte for byte: sorted keys, two-space indent, final newline."""
    return json.dumps(metadata(name), indent=2, sort_keys=True, ensure_ascii=False) + '\n'


def write_metadata(names=None) -> list[pathlib.Path]:
    """Writes ``templates/<name>/metadata.json`` for ``names`` (default: every registered pipeline)."""
    written = []
    for name in sorted(registry.PIPELINES if names is None else names):
        path = metadata_path(name)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(render(name), encoding='utf-8')
        written.append(path)
    return written


def _has_flag(argv: list[str], flag: str) -> bool:
    return any(arg == flag or arg.startswith(flag + '=') for arg in argv)


def launch_argv(argv: list[str], environ) -> tuple[str, list[str]]:
    """The pipeline to run and its arguments, for a launch inside the template image.

    The workers run the same image as the launcher (``HRBATCH_SDK_CONTAINER_IMAGE``, baked in at build),
    so nothing is staged: the Beam SDK and hrbatch are already installed there (``--sdk_location=container``).
    """
    name = environ.get(PIPELINE_ENV)
    if not name:
        raise ConfigError(f'${PIPELINE_ENV} is not set: this image was not built for a pipeline; build it '
                          'with hrbatch template build --pipeline NAME')
    registry.load(name)  # unknown name: ConfigError listing the available ones
    extra = []
    if not _has_flag(argv, '--sdk_location'):
        extra.append('--sdk_location=container')
    image = environ.get(IMAGE_ENV)
    if image and not _has_flag(argv, '--sdk_container_image'):
        extra.append(f'--sdk_container_image={image}')
    return name, [*argv, *extra]


def launch(argv: list[str] | None = None, environ=None) -> int:
    """Entry point of the Flex Template launcher: runs the image's pipeline on ``argv``."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        name, args = launch_argv(argv, os.environ if environ is None else environ)
        registry.load(name).run(args)
    except ConfigError as err:
        print(f'hrbatch: error: {err}', file=sys.stderr)
        return 2
    return 0


# --- hrbatch template metadata|build|run -------------------------------------------------------------

def beam_version() -> str:
    """The Apache Beam version pinned in requirements.txt, the one place it is pinned."""
    requirements = TEMPLATES_DIR.parent / 'requirements.txt'
    for line in requirements.read_text(encoding='utf-8').splitlines():
        if line.strip().lower().startswith('apache-beam=='):
            return line.split('==', 1)[1].split(';', 1)[0].strip()
    raise ConfigError(f'{requirements}: no apache-beam==VERSION line')


def build_commands(name: str, image: str, template: str) -> list[list[str]]:
    """The commands that build and push ``image`` for pipeline ``name`` and write its template spec
    to ``template`` (gs://...), run from the repository root."""
    registry.load(name)
    return [
        ['docker', 'build', '-f', 'templates/Dockerfile', '--build-arg', f'BEAM_VERSION={beam_version()}',
         '--build-arg', f'PIPELINE={name}', '--build-arg', f'IMAGE={image}', '-t', image, '.'],
        ['docker', 'push', image],
        ['gcloud', 'dataflow', 'flex-template', 'build', template, '--image', image, '--sdk-language', 'PYTHON',
         '--metadata-file', str(metadata_path(name).relative_to(TEMPLATES_DIR.parent))],
    ]


def _parameters_flag(parameters: dict[str, str]) -> str:
    """gcloud's ``--parameters`` value; with gcloud's ``^D^`` escape when a value holds a comma (JSON)."""
    pairs = [f'{key}={value}' for key, value in parameters.items()]
    if not any(',' in pair for pair in pairs):
        return '--parameters=' + ','.join(pairs)
    delimiter = next(d for d in ('~', '|', '#', '!', ':') if not any(d in pair for pair in pairs))
    return f'--parameters=^{delimiter}^' + delimiter.join(pairs)


def run_command(name: str, template: str, job_name: str, region: str, project: str | None,
                parameters: dict[str, str]) -> list[str]:
    """The ``gcloud dataflow flex-template run`` command, after checking ``parameters`` exactly as the
    launch will parse them: a mistake fails here, not twenty minutes later on a launcher VM."""
    module = registry.load(name)
    options = {option.name: option for option in module.OPTIONS}
    unknown = sorted(set(parameters) - set(options))
    if unknown:
        raise ConfigError(f'unknown parameter(s) {", ".join(unknown)} of template {name}; '
                          f'parameters: {", ".join(options)}')
    missing = [o.name for o in module.OPTIONS if o.required and o.name not in parameters]
    if missing:
        raise ConfigError(f'template {name} needs the parameter(s) {", ".join(missing)}')
    for key, text in parameters.items():
        options[key].parse(text)
    command = ['gcloud', 'dataflow', 'flex-template', 'run', job_name, f'--template-file-gcs-location={template}',
               f'--region={region}']
    if project:
        command.append(f'--project={project}')
    if parameters:
        command.append(_parameters_flag(parameters))
    return command


def _key_value(text: str) -> tuple[str, str]:
    key, sep, value = text.partition('=')
    if not sep or not key:
        raise ConfigError(f'--parameter {text!r}: expected NAME=VALUE')
    return key, value


def _execute_or_print(commands: list[list[str]], execute: bool, out) -> int:
    if not execute:
        for command in commands:
            print(shlex.join(command), file=out)
        return 0
    for command in commands:
        if shutil.which(command[0]) is None:
            raise ConfigError(f'{command[0]} is not installed here; run without --execute to print the commands')
        print('+ ' + shlex.join(command), file=out, flush=True)
        returncode = subprocess.run(command, cwd=TEMPLATES_DIR.parent, check=False).returncode
        if returncode:
            return returncode
    return 0


def main(argv: list[str], out=None) -> int:
    """``hrbatch template metadata|build|run``."""
    out = sys.stdout if out is None else out
    parser = opts.ConfigErrorParser(prog='hrbatch template', description='Dataflow Flex Templates.')
    commands = parser.add_subparsers(dest='command', required=True)
    commands.add_parser('metadata', help='rewrite templates/<pipeline>/metadata.json from the options')
    build = commands.add_parser('build', help='build and push the image, write the template spec')
    build.add_argument('--pipeline', required=True)
    build.add_argument('--image', required=True, help='e.g. europe-west9-docker.pkg.dev/PROJECT/hrbatch/matching:1')
    build.add_argument('--template', required=True, help='gs:// path of the template spec file to write')
    run = commands.add_parser('run', help='launch a job from a built template')
    run.add_argument('--pipeline', required=True)
    run.add_argument('--template', required=True, help='gs:// path of the template spec file')
    run.add_argument('--job_name', required=True)
    run.add_argument('--region', required=True)
    run.add_argument('--project')
    run.add_argument('--parameter', action='append', default=[], type=_key_value, metavar='NAME=VALUE')
    for sub in (build, run):
        sub.add_argument('--execute', action='store_true', help='run the commands (needs docker and gcloud)')
    args = parser.parse_args(argv)
    if args.command == 'metadata':
        for path in write_metadata():
            print(path, file=out)
        return 0
    if args.command == 'build':
        if not args.template.startswith('gs://'):
            raise ConfigError(f'--template={args.template!r}: must be a gs:// path')
        return _execute_or_print(build_commands(args.pipeline, args.image, args.template), args.execute, out)
    command = run_command(args.pipeline, args.template, args.job_name, args.region, args.project,
                          dict(args.parameter))
    return _execute_or_print([command], args.execute, out)

"""Pipeline options, declared once.

Each pipeline declares its parameters as a tuple of ``Option``. The same declaration builds the
command-line parser and (in later work) the Flex Template ``metadata.json`` and the README table.
Values arrive as strings (from a shell or a template launch), so they are parsed strictly: booleans
are ``true``/``false``, JSON must parse, numbers must be in range, and an unknown flag is an error,
not a warning. Any flag that is not a pipeline option must be a Beam pipeline option (``--runner``,
``--direct_num_workers``, ...): those are passed on to Beam untouched.
"""
import argparse
import dataclasses
import difflib
import json
import typing

from apache_beam.options import pipeline_options as beam_options

from transforms.errors import ConfigError

_TYPES = ('string', 'int', 'float', 'bool', 'json')


@dataclasses.dataclass(frozen=True)
class Option:
    name: str
    help: str
    type: str = 'string'
    required: bool = False
    default: typing.Any = None
    choices: tuple[str, ...] | None = None
    min_value: float | None = None
    max_value: float | None = None

    def __post_init__(self):
        if self.type not in _TYPES:
            raise ValueError(f'Option {self.name!r}: type must be one of {_TYPES}, got {self.type!r}')

    @property
    def flag(self) -> str:
        return f'--{self.name}'

    def parse(self, text: str):
        """The typed value of ``text``, or ConfigError naming the flag, the value and what is allowed."""
        try:
            value = _PARSERS[self.type](text)
        except ValueError as err:
            raise ConfigError(f'{self.flag}={text!r}: {err}') from None
        if self.choices is not None and value not in self.choices:
            raise ConfigError(f'{self.flag}={text!r}: must be one of {", ".join(self.choices)}')
        low, high = self.min_value, self.max_value
        if (low is not None and value < low) or (high is not None and value > high):
            bounds = f'>= {low}' if high is None else f'<= {high}' if low is None else f'in [{low}, {high}]'
            raise ConfigError(f'{self.flag}={text!r}: must be {bounds}')
        return value


def _parse_bool(text: str) -> bool:
    lowered = text.strip().lower()
    if lowered not in ('true', 'false'):
        raise ValueError('must be true or false')
    return lowered == 'true'


def _parse_int(text: str) -> int:
    try:
        return int(text)
    except ValueError:
        raise ValueError('must be an integer') from None


def _parse_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError('must be a number') from None
    if value != value or value in (float('inf'), float('-inf')):
        raise ValueError('must be a finite number')
    return value


def _parse_json(text: str):
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise ValueError(f'is not valid JSON ({err.msg} at position {err.pos})') from None


_PARSERS = {'string': str, 'int': _parse_int, 'float': _parse_float, 'bool': _parse_bool, 'json': _parse_json}


class ConfigErrorParser(argparse.ArgumentParser):
    """argparse that raises ConfigError instead of exiting, so callers and tests see the message."""

    def error(self, message):
        raise ConfigError(f'{self.prog}: {message}')


def _beam_flags() -> set[str]:
    parser = beam_options._BeamArgumentParser(allow_abbrev=False)  # the parser Beam itself uses
    seen = {}
    for cls in beam_options.PipelineOptions.__subclasses__():
        seen.setdefault(str(cls), cls)
    for cls in seen.values():
        cls._add_argparse_args(parser)
    return {flag for action in parser._actions for flag in action.option_strings}


def _check_beam_args(args: list[str], own: tuple[Option, ...]) -> None:
    known = _beam_flags()
    for arg in args:
        if not arg.startswith('-'):
            continue
        flag = arg.split('=', 1)[0]
        if flag not in known:
            candidates = sorted({o.flag for o in own} | known)
            close = difflib.get_close_matches(flag, candidates, n=3)
            hint = f' Did you mean {", ".join(close)}?' if close else ''
            raise ConfigError(
                f'unknown option {flag}: it is neither an option of this pipeline '
                f'({", ".join(o.flag for o in own)}) nor a Beam pipeline option.{hint}')


def parse(options: tuple[Option, ...], argv: list[str], *, prog: str) -> tuple[dict, list[str]]:
    """Splits ``argv`` into this pipeline's typed values and the Beam flags to pass on."""
    parser = ConfigErrorParser(prog=prog, allow_abbrev=False, description=f'{prog} pipeline options')
    for option in options:
        # A bare boolean flag (--force) means true; templates pass --force=true or --force=false.
        extra = {'nargs': '?', 'const': 'true'} if option.type == 'bool' else {}
        parser.add_argument(option.flag, dest=option.name, required=option.required, default=None,
                            metavar=option.type.upper(), help=option.help, **extra)
    known, rest = parser.parse_known_args(argv)
    _check_beam_args(rest, options)
    values = {}
    for option in options:
        text = getattr(known, option.name)
        values[option.name] = option.default if text is None else option.parse(text)
    return values, rest


def help_text(options: tuple[Option, ...], *, prog: str) -> str:
    parser = ConfigErrorParser(prog=prog, allow_abbrev=False)
    for option in options:
        default = '' if option.default is None else f' (default: {option.default})'
        parser.add_argument(option.flag, required=option.required, metavar=option.type.upper(),
                            help=option.help + default)
    return parser.format_help() + '\nAny Beam pipeline option (--runner, --direct_num_workers, ...) is accepted too.\n'

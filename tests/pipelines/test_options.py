import pytest

from pipelines import options as opts
from transforms.errors import ConfigError

SPEC = (
    opts.Option('input', 'Input.', required=True),
    opts.Option('limit', 'A count.', type='int', default=10, min_value=1, max_value=100),
    opts.Option('ratio', 'A share.', type='float', default=0.5, min_value=0.0, max_value=1.0),
    opts.Option('dry_run', 'Only report.', type='bool', default=False),
    opts.Option('weights', 'JSON.', type='json', default={}),
    opts.Option('mode', 'A choice.', choices=('fast', 'safe'), default='safe'),
)


def test_values_are_typed_and_beam_flags_pass_through():
    values, beam_args = opts.parse(SPEC, ['--input', 'a.csv', '--limit', '7', '--dry_run', 'true',
                                          '--weights', '{"x": 1}', '--runner', 'FnApiRunner',
                                          '--direct_num_workers=2'], prog='t')
    assert values == {'input': 'a.csv', 'limit': 7, 'ratio': 0.5, 'dry_run': True, 'weights': {'x': 1},
                      'mode': 'safe'}
    assert beam_args == ['--runner', 'FnApiRunner', '--direct_num_workers=2']


@pytest.mark.parametrize('argv, message', [
    (['--limit', '0'], "--limit='0': must be in [1, 100]"),
    (['--limit', 'ten'], "--limit='ten': must be an integer"),
    (['--ratio', 'nan'], "--ratio='nan': must be a finite number"),
    (['--dry_run', 'yes'], "--dry_run='yes': must be true or false"),
    (['--weights', '{x}'], "--weights='{x}': is not valid JSON"),
    (['--mode', 'slow'], "--mode='slow': must be one of fast, safe"),
    (['--limt', '3'], 'unknown option --limt: .* Did you mean --limit'),
    (['--frobnicate'], 'unknown option --frobnicate'),
])
def test_bad_values_and_unknown_flags_raise_config_errors_naming_them(argv, message):
    with pytest.raises(ConfigError, match=message.replace('[', r'\[').replace(']', r'\]').replace('{', r'\{')
                       .replace('}', r'\}') if 'unknown' not in message else message):
        opts.parse(SPEC, ['--input', 'x', *argv], prog='t')


def test_a_missing_required_option_is_named():
    with pytest.raises(ConfigError, match='--input'):
        opts.parse(SPEC, [], prog='t')


def test_option_types_are_checked_at_declaration():
    with pytest.raises(ValueError, match='type must be one of'):
        opts.Option('x', 'X.', type='list')

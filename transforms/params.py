"""Checks of transform parameters, raising ValueError naming the parameter, the value and what is allowed."""


def check_positive_int(name: str, value, maximum: int | None = None) -> None:
    """``value`` must be an int (not a bool) from 1 to ``maximum`` (no upper bound if None)."""
    ok = isinstance(value, int) and not isinstance(value, bool) and value >= 1
    if ok and maximum is not None:
        ok = value <= maximum
    if not ok:
        allowed = f'an integer from 1 to {maximum:_}' if maximum is not None else 'an integer >= 1'
        raise ValueError(f'{name}={value!r} is not allowed: {name} must be {allowed}')

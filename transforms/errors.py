"""The project's exception hierarchy.

``HrbatchError`` is the single root. ``ConfigError`` is raised at launch, before any data is read, with
a message naming the flag or input, the bad value, what is allowed and how to fix it. ``RecordError``
is the only exception a transform catches to route a record to the dead-letter output: any other
exception is a bug and must fail the job.
"""


class HrbatchError(Exception):
    """Root of every error raised on purpose by hrbatch."""


class ConfigError(HrbatchError):
    """A bad option, parameter or input detected at launch."""


class RecordError(HrbatchError):
    """One record cannot be processed; it goes to the dead-letter output with this message."""

"""The one exception type users see: a clear message, no traceback, non-zero exit."""


class PipelineError(Exception):
    """Bad input or configuration, reported before expensive work starts."""

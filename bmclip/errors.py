"""Errors that bmclip reports to users as a clear message (the CLI prints them without a traceback)."""


class BmclipError(Exception):
    """Base class of user-facing errors (bad config, bad input, bad checkpoint)."""


class ConfigError(BmclipError, ValueError):
    """A configuration key or value is wrong; the message names the key."""


class CheckpointError(BmclipError):
    """A checkpoint cannot be loaded: unknown/missing keys, unsafe pickle, corrupt file."""


class DataError(BmclipError):
    """Input data cannot be read (corrupt shard, malformed XML, unknown dataset spec)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM arrived: raised in the main thread by the ``bmclip`` command's handler, so that ``with`` blocks
    and ``finally`` clauses unwind as for Ctrl-C (a subclass of KeyboardInterrupt, which ``except
    Exception`` clauses do not swallow)."""

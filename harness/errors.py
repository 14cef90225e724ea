"""The errors a user can act on; they live below everything that raises them.

`ConfigError`: a configuration, protocol, dataset layout or checkpoint the harness refuses to run.
`UsageError`: a bad command line (unknown command, option, id or seed).
`Terminated`: SIGTERM, unwound like Ctrl-C (the CLI exits 143).

The CLI prints either as one paragraph and exits with code 2; nothing is written before they are
raised. Bugs are any other exception and keep their traceback.
"""
from __future__ import annotations

EXIT_USAGE = 2


class ConfigError(ValueError):
    """A configuration the harness refuses to run; the message says what to write instead."""


class UsageError(Exception):
    """Bad command-line usage (exit code 2)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a scheduler's or a user's kill): unwinds like Ctrl-C, so a run saves its state and ends
    as interrupted; the CLI says 'terminated' and exits 143."""

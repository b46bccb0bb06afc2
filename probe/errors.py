"""The one exception tree of the probe.

    ProbeError                 anything the probe reports as one sentence to a user
    +-- ConfigError            bad configuration, options, files or scenarios (CLI exit code 2)
    +-- ProtocolError          a peer sent something PROTOCOL.md does not allow
    +-- TargetUnreachable      the system under test (or a sink) could not be reached
    +-- Interrupted            a signal cut a run short; its partial report is out (CLI exit
                               code 128 + the signal: 130 SIGINT, 143 SIGTERM)

Every message is written for a person: it says what was wrong and, where it can, what to do.
"""

from __future__ import annotations


class ProbeError(Exception):
    """Root of every error the probe raises on purpose."""


class ConfigError(ProbeError):
    """Bad configuration or input file: the user's to fix."""


class ProtocolError(ProbeError):
    """A message or stream that breaks the wire protocol."""


class TargetUnreachable(ProbeError):
    """The system under test or a sink could not be reached."""


class GeneratorFailed(ProbeError):
    """The probe itself failed during a run (its sink child died): its report is out, marked
    ``invalid``, and says nothing about the target from then on."""


class Interrupted(ProbeError):
    """A run was cut short by a signal (SIGINT, SIGTERM) and its partial report is out."""

    def __init__(self, message: str, signal_number: int) -> None:
        super().__init__(message)
        self.signal_number = signal_number

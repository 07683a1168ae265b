"""Signal names and numbers.

Two different parsers on purpose. ``parse_signal`` is for what a user types (``TERM``,
``SIGTERM``, ``sigterm``, ``15``) and rejects anything it does not know. ``reference_stop_signal``
reproduces the reference's stop-signal rule exactly (only ``SIG``-prefixed classic names count,
anything else means SIGTERM) so that a container created with the reference's semantics behaves
the same; the library stores the number it resolved, so the quirk never surprises a user twice.
"""
from __future__ import annotations

from typing import Dict, Union

from ansible_collections.daemonless.oci.plugins.module_utils.errors import ValidationError

DEFAULT_STOP_SIGNAL = 15

# The 31 classic Linux signals, with the canonical spellings of the reference's table.
CLASSIC_SIGNALS: Dict[str, int] = {
    "SIGHUP": 1, "SIGINT": 2, "SIGQUIT": 3, "SIGILL": 4, "SIGTRAP": 5, "SIGABRT": 6, "SIGBUS": 7,
    "SIGFPE": 8, "SIGKILL": 9, "SIGUSR1": 10, "SIGSEGV": 11, "SIGUSR2": 12, "SIGPIPE": 13,
    "SIGALRM": 14, "SIGTERM": 15, "SIGSTKFLT": 16, "SIGCHLD": 17, "SIGCONT": 18, "SIGSTOP": 19,
    "SIGTSTP": 20, "SIGTTIN": 21, "SIGTTOU": 22, "SIGURG": 23, "SIGXCPU": 24, "SIGXFSZ": 25,
    "SIGVTALRM": 26, "SIGPROF": 27, "SIGWINCH": 28, "SIGIO": 29, "SIGPWR": 30, "SIGSYS": 31,
}
_ALIASES = {"SIGIOT": 6, "SIGPOLL": 29, "SIGCLD": 17}
NAMES_BY_NUMBER = {number: name for name, number in CLASSIC_SIGNALS.items()}


def reference_stop_signal(configured: str) -> int:
    """The reference's GetStopSignal: empty or unknown -> 15; only ``SIG``-prefixed classic names."""
    if not configured:
        return DEFAULT_STOP_SIGNAL
    return CLASSIC_SIGNALS.get(configured.upper(), DEFAULT_STOP_SIGNAL)


def parse_signal(value: Union[str, int]) -> int:
    """Parse a user-supplied signal (name with or without ``SIG``, any case, or a number 1-31)."""
    if isinstance(value, bool):
        raise ValidationError("signal must be a name or a number, not a boolean")
    if isinstance(value, int):
        number = value
    else:
        text = str(value).strip().upper()
        if text.isdigit():
            number = int(text)
        else:
            name = text if text.startswith("SIG") else "SIG" + text
            number = CLASSIC_SIGNALS.get(name) or _ALIASES.get(name, 0)
            if not number:
                raise ValidationError("unknown signal {!r}: use a name such as SIGTERM or a number from 1 to 31"
                                      .format(value))
    if not 1 <= number <= 31:
        raise ValidationError("unable to find signal {}: signals must be between 1 and 31".format(value))
    return number


def signal_name(number: int) -> str:
    """The canonical name of a classic signal number, for messages."""
    return NAMES_BY_NUMBER.get(number, str(number))

"""Firewall backends: apply a :class:`~l2tp_marker.rules.RuleSet`, behind one small interface.

A backend offers ``is_supported() -> (bool, why)``, ``install(ruleset)`` (idempotent: removes any
leftover of the same chains first, so a restart or a crash leftover never duplicates rules),
``remove(ruleset)`` (safe when nothing is installed) and ``check(ruleset) -> [problems]``.
"""

from __future__ import annotations

from typing import Protocol

from ..rules import RuleSet


class Backend(Protocol):
    name: str

    def is_supported(self) -> tuple[bool, str]: ...

    def install(self, ruleset: RuleSet) -> None: ...

    def remove(self, ruleset: RuleSet) -> None: ...

    def check(self, ruleset: RuleSet) -> list[str]: ...


class BackendError(Exception):
    """The backend could not apply or remove rules; the message says which and why."""


def get_backend(name: str) -> Backend:
    if name == "iptables-legacy":
        from .iptables_legacy import IptablesLegacyBackend

        return IptablesLegacyBackend()
    raise BackendError(f"unknown firewall backend {name!r}")

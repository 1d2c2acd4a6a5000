"""Legacy iptables (libiptc, through python-iptables): where strongSwan's connmark plugin puts its rules.

Only this module touches the firewall. Each change is one libiptc commit of the whole table, so an
install is applied atomically: either every rule and jump is there, or none.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import time

from ..rules import Rule, RuleSet
from . import BackendError

log = logging.getLogger(__name__)

XTABLES_LOCK = "/run/xtables.lock"


@contextlib.contextmanager
def xtables_lock(path: str = XTABLES_LOCK, wait: float = 10.0):
    """Hold the lock iptables-legacy takes, so our table commit and another tool's never interleave."""
    fd = os.open(path, os.O_CREAT | os.O_RDWR, 0o600)
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    raise BackendError(f"another program holds {path} for more than {wait:g} s") from None
                time.sleep(0.05)
        yield
    finally:
        os.close(fd)


def _iptc():
    try:
        import iptc  # noqa: PLC0415 - imported lazily: loading libiptc needs the xtables libraries
    except Exception as exc:  # python-iptables raises plain exceptions when libxtables is missing
        raise BackendError(f"python-iptables is not usable: {exc}") from exc
    return iptc


def to_iptc(rule: Rule):
    """Build the python-iptables rule object for ``rule``."""
    iptc = _iptc()
    r = iptc.Rule()
    r.protocol = rule.protocol
    if rule.sport is not None or rule.dport is not None:
        m = r.create_match(rule.protocol)
        if rule.sport is not None:
            m.sport = str(rule.sport)
        if rule.dport is not None:
            m.dport = str(rule.dport)
    if rule.mark_nonzero_mask is not None:
        m = r.create_match("mark")
        m.mark = f"!0x0/{rule.mark_nonzero_mask:#x}"
    if rule.bit_clear is not None:
        m = r.create_match("mark")
        m.mark = f"!{rule.bit_clear:#x}/{rule.bit_clear:#x}"
    if rule.ipsec_in:
        m = r.create_match("policy")
        m.dir = "in"
        m.pol = "ipsec"
    m = r.create_match("comment")
    m.comment = rule.comment
    t = r.create_target(rule.target)
    if rule.target == "NFQUEUE":
        t.queue_num = str(rule.queue_num)
        if rule.queue_bypass:
            t.queue_bypass = ""
    elif rule.target == "MARK":
        t.set_xmark = f"0x0/{rule.clear_bits:#x}"
    elif rule.target == "NFLOG":
        if rule.nflog_group is not None:
            t.nflog_group = str(rule.nflog_group)
        if rule.nflog_threshold is not None:
            t.nflog_threshold = str(rule.nflog_threshold)
    return r


def strip_chains(table, chains) -> int:
    """Remove every jump into ``chains``, then the chains. Returns how many objects were removed."""
    iptc = _iptc()
    ours = set(chains)
    removed = 0
    for chain in table.chains:
        if chain.name in ours:
            continue
        for r in list(chain.rules):
            if r.target.name in ours:
                chain.delete_rule(r)
                removed += 1
    for name in chains:
        if table.is_chain(name):
            c = iptc.Chain(table, name)
            c.flush()
            c.delete()
            removed += 1
    return removed


def _normal(rule) -> dict:
    """A comparable form of a python-iptables rule (binary compare trips on unused match bytes)."""
    import iptc.easy  # noqa: PLC0415

    d = iptc.easy.decode_iptc_rule(rule)
    d.pop("counters", None)
    return d


class IptablesLegacyBackend:
    name = "iptables-legacy"

    def is_supported(self) -> tuple[bool, str]:
        if os.geteuid() != 0:
            return False, "needs root (CAP_NET_ADMIN) to change netfilter rules"
        try:
            iptc = _iptc()
            iptc.Table(iptc.Table.MANGLE).refresh()
        except Exception as exc:
            return False, f"legacy iptables mangle table not usable: {exc}"
        return True, "legacy iptables mangle table"

    def _table(self, name: str):
        iptc = _iptc()
        t = iptc.Table(name)
        t.autocommit = False
        t.refresh()
        return t

    def _strip(self, table, ruleset: RuleSet) -> int:
        return strip_chains(table, ruleset.chains)

    def install(self, ruleset: RuleSet) -> None:
        iptc = _iptc()
        try:
            with xtables_lock():
                self._install_locked(iptc, ruleset)
        except iptc.IPTCError as exc:
            raise BackendError(f"installing rules in legacy {ruleset.table} failed: {exc}") from exc
        for cmd in ruleset.commands():
            log.debug("iptables-legacy %s", " ".join(cmd))

    def _install_locked(self, iptc, ruleset: RuleSet) -> None:
        t = self._table(ruleset.table)
        leftovers = self._strip(t, ruleset)
        if leftovers:
            log.info("removed %d leftover rules/chains of an earlier run", leftovers)
        for name in ruleset.chains:
            t.create_chain(name)
        for rule in ruleset.rules:
            iptc.Chain(t, rule.chain).append_rule(to_iptc(rule))
        for jump in ruleset.jumps:
            iptc.Chain(t, jump.chain).append_rule(to_iptc(jump))
        t.commit()
        t.refresh()
        t.autocommit = True

    def remove(self, ruleset: RuleSet) -> None:
        iptc = _iptc()
        try:
            with xtables_lock():
                t = self._table(ruleset.table)
                n = self._strip(t, ruleset)
                t.commit()
                t.refresh()
                t.autocommit = True
        except iptc.IPTCError as exc:
            raise BackendError(f"removing rules from legacy {ruleset.table} failed: {exc}") from exc
        log.debug("removed %d rules/chains", n)

    def check(self, ruleset: RuleSet) -> list[str]:
        iptc = _iptc()
        problems: list[str] = []
        try:
            t = self._table(ruleset.table)
        except iptc.IPTCError as exc:
            return [f"cannot read legacy {ruleset.table}: {exc}"]
        for name in ruleset.chains:
            if not t.is_chain(name):
                problems.append(f"chain {name} is missing")
                continue
            have = [_normal(r) for r in iptc.Chain(t, name).rules]
            want = [_normal(to_iptc(r)) for r in ruleset.rules if r.chain == name]
            if have != want:
                problems.append(f"chain {name} does not hold the expected rules")
        for jump in ruleset.jumps:
            if not t.is_chain(jump.chain):
                problems.append(f"chain {jump.chain} is missing")
                continue
            found = [r for r in iptc.Chain(t, jump.chain).rules if r.target.name == jump.target]
            if not found:
                problems.append(f"no jump from {jump.chain} to {jump.target}")
            elif len(found) > 1:
                problems.append(f"{len(found)} jumps from {jump.chain} to {jump.target} (expected 1)")
        return problems

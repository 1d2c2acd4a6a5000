"""The marker's netfilter rules, built as data from the configuration (no I/O here).

Placement (DOMAIN.md section 2): the strongSwan connmark plugin inserts its rules at the top of the
legacy mangle INPUT/OUTPUT chains; the marker *appends* one jump to each, so it always runs after
the plugin's CONNMARK rules (the OUTPUT restore has set the mark the engine then corrects). Only
what must be judged is queued: inbound udp/1701 that arrived with a mark (and, by default, through
IPsec), outbound udp sport 1701. Every queue rule has ``--queue-bypass``: with no daemon listening
the kernel accepts the packet and plain connmark behaviour remains.
"""

from __future__ import annotations

from dataclasses import dataclass

from .constants import L2TP_PORT

COMMENT = "l2tp-marker"


@dataclass(frozen=True)
class Rule:
    """One iptables rule in ``chain`` (a subset of iptables, enough for the marker)."""

    chain: str
    target: str
    protocol: str = "udp"
    sport: int | None = None
    dport: int | None = None
    mark_nonzero_mask: int | None = None  # `-m mark ! --mark 0/MASK`
    bit_clear: int | None = None          # `-m mark ! --mark BIT/BIT` (the fast path did not handle it)
    ipsec_in: bool = False                # `-m policy --dir in --pol ipsec`
    queue_num: int | None = None          # NFQUEUE target
    queue_bypass: bool = False
    comment: str = COMMENT
    nflog_group: int | None = None        # NFLOG target (`l2tp-marker capture`)
    nflog_threshold: int | None = None    # NFLOG: packets the kernel batches before sending (1 = none)
    clear_bits: int | None = None         # MARK target: `--set-xmark 0/BITS`

    def argv(self) -> list[str]:
        """The rule in iptables syntax (without the table and the -A CHAIN)."""
        a = ["-p", self.protocol]
        if self.sport is not None or self.dport is not None:
            a += ["-m", self.protocol]
            if self.sport is not None:
                a += ["--sport", str(self.sport)]
            if self.dport is not None:
                a += ["--dport", str(self.dport)]
        if self.mark_nonzero_mask is not None:
            a += ["-m", "mark", "!", "--mark", f"0x0/{self.mark_nonzero_mask:#x}"]
        if self.bit_clear is not None:
            a += ["-m", "mark", "!", "--mark", f"{self.bit_clear:#x}/{self.bit_clear:#x}"]
        if self.ipsec_in:
            a += ["-m", "policy", "--dir", "in", "--pol", "ipsec"]
        a += ["-m", "comment", "--comment", self.comment]
        a += ["-j", self.target]
        if self.target == "NFQUEUE":
            a += ["--queue-num", str(self.queue_num)]
            if self.queue_bypass:
                a.append("--queue-bypass")
        elif self.target == "MARK":
            a += ["--set-xmark", f"0x0/{self.clear_bits:#x}"]
        elif self.target == "NFLOG":
            if self.nflog_group is not None:
                a += ["--nflog-group", str(self.nflog_group)]
            if self.nflog_threshold is not None:
                a += ["--nflog-threshold", str(self.nflog_threshold)]
        return a


@dataclass(frozen=True)
class RuleSet:
    """The chains the marker owns and the jumps into them from the built-in chains."""

    table: str
    chains: tuple[str, ...]
    rules: tuple[Rule, ...]
    jumps: tuple[Rule, ...]

    def commands(self) -> list[list[str]]:
        """What installing means, as iptables argument lists (for logs, doctor and tests)."""
        out = [["-t", self.table, "-N", c] for c in self.chains]
        out += [["-t", self.table, "-A", r.chain, *r.argv()] for r in self.rules]
        out += [["-t", self.table, "-A", j.chain, *j.argv()] for j in self.jumps]
        return out


def build_rules(*, prefix: str, queue_in: int, queue_out: int, mark_mask: int,
                inbound_match: str, fastpath_bit: int | None = None) -> RuleSet:
    """The marker's rule set for one configuration.

    With the kernel fast path (``fastpath_bit``), a packet the fast path handled carries that bit:
    it is not queued, and the bit is cleared (outbound: the kernel then reroutes on the exact SA
    mark, which is what selects the SA). Every other packet is queued as before.
    """
    chain_in, chain_out = f"{prefix}-IN", f"{prefix}-OUT"
    rules = [
        Rule(chain_in, "NFQUEUE", dport=L2TP_PORT, mark_nonzero_mask=mark_mask, bit_clear=fastpath_bit,
             ipsec_in=inbound_match == "ipsec", queue_num=queue_in, queue_bypass=True),
        Rule(chain_out, "NFQUEUE", sport=L2TP_PORT, bit_clear=fastpath_bit, queue_num=queue_out,
             queue_bypass=True),
    ]
    if fastpath_bit is not None:
        rules.insert(1, Rule(chain_in, "MARK", dport=L2TP_PORT, clear_bits=fastpath_bit))
        rules.append(Rule(chain_out, "MARK", sport=L2TP_PORT, clear_bits=fastpath_bit))
    jumps = (
        Rule("INPUT", chain_in, dport=L2TP_PORT),
        Rule("OUTPUT", chain_out, sport=L2TP_PORT),
    )
    return RuleSet("mangle", (chain_in, chain_out), tuple(rules), jumps)

"""``l2tp-marker doctor``, the pure part: checks over collected facts (no I/O here).

:mod:`~l2tp_marker.doctor_probe` collects a :class:`Facts` value (rule listings, ``ip xfrm`` text,
sysctls, conntrack lines, the xl2tpd processes and their configuration, the kernel's NFQUEUE
instances, the nftables ruleset with the kernel fast path's table, the daemon's status reply) and
:func:`diagnose` turns it into :class:`Check` values, each PASS, WARN, FAIL or INFO with a one-line
explanation and, where something is wrong, the fix.
A fact that could not be collected (a missing tool, no permission) is a fact too: the check that
needs it says so instead of guessing. See ``DOMAIN.md`` for the why behind each check.
"""

from __future__ import annotations

import ipaddress
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .constants import L2TP_PORT
from .fastpath import DEFAULT_BIT, PRIORITY, table_name
from .rules import Rule, RuleSet, build_rules

PASS, WARN, FAIL, INFO = "PASS", "WARN", "FAIL", "INFO"
LEVELS = (PASS, WARN, FAIL, INFO)
DEFAULT_XL2TPD_CONF = "/etc/xl2tpd/xl2tpd.conf"
_TWICE_RE = re.compile(r"Peer requested tunnel (\d+) twice")
_TRUE = {"yes", "true", "1", "on"}


# --------------------------------------------------------------------------------------------
# Facts
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Output:
    """The text of a command or file, or why there is none (``text is None``)."""

    text: str | None = None
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.text is not None

    def why(self) -> str:
        return self.error or "not collected"


@dataclass(frozen=True)
class Xl2tpdProcess:
    pid: int
    argv: tuple[str, ...]
    config_path: str


@dataclass(frozen=True)
class TextFile:
    """A file doctor read (an xl2tpd configuration or log); ``source`` says why it was read."""

    path: str
    text: str | None
    error: str | None = None
    source: str = ""


@dataclass(frozen=True)
class Facts:
    """Everything one doctor run looked at, in the host or in one network namespace."""

    netns: str | None = None
    legacy_mangle: Output = Output(error="not collected")   # iptables-legacy -t mangle -S -v
    nft_mangle: Output = Output(error="not collected")      # iptables-nft -t mangle -S -v
    nft_ruleset: Output = Output(error="not collected")     # nft -t list ruleset (sets without elements)
    xfrm_state: Output = Output(error="not collected")      # ip xfrm state
    xfrm_policy: Output = Output(error="not collected")     # ip xfrm policy
    conntrack: Output = Output(error="not collected")       # conntrack -L -p udp --dport 1701
    nfqueue: Output = Output(error="not collected")         # /proc/net/netfilter/nfnetlink_queue
    # interface ("all", "default", "eth0"...) -> {"rp_filter": n, "src_valid_mark": n}
    ipv4_conf: Mapping[str, Mapping[str, int]] = field(default_factory=dict)
    xl2tpd: tuple[Xl2tpdProcess, ...] = ()
    xl2tpd_configs: tuple[TextFile, ...] = ()
    xl2tpd_logs: tuple[TextFile, ...] = ()
    marker_pids: tuple[int, ...] = ()                       # `l2tp-marker run` processes seen
    control_socket: str = ""
    status: Mapping[str, Any] | None = None                 # the daemon's status reply
    status_error: str | None = None
    ruleset: RuleSet | None = None                          # what the marker's config installs (no fast path)
    fastpath_setting: str | None = None                     # the config's fastpath (auto/on/off)
    fastpath_bit: int | None = None                         # the config's fastpath_bit

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Facts:
        """Inverse of :meth:`to_dict` (the namespace probe sends its facts as JSON)."""
        kw: dict[str, Any] = {}
        for f in fields(cls):
            if f.name not in data:
                continue
            v = data[f.name]
            if f.name in ("legacy_mangle", "nft_mangle", "nft_ruleset", "xfrm_state", "xfrm_policy",
                          "conntrack", "nfqueue"):
                v = Output(**v)
            elif f.name == "xl2tpd":
                v = tuple(Xl2tpdProcess(pid=p["pid"], argv=tuple(p["argv"]), config_path=p["config_path"])
                          for p in v)
            elif f.name in ("xl2tpd_configs", "xl2tpd_logs"):
                v = tuple(TextFile(**t) for t in v)
            elif f.name == "marker_pids":
                v = tuple(v)
            elif f.name == "ruleset" and v is not None:
                v = RuleSet(table=v["table"], chains=tuple(v["chains"]),
                            rules=tuple(Rule(**r) for r in v["rules"]),
                            jumps=tuple(Rule(**r) for r in v["jumps"]))
            kw[f.name] = v
        return cls(**kw)


@dataclass(frozen=True)
class Check:
    name: str
    level: str
    summary: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.level not in LEVELS:
            raise ValueError(f"unknown level {self.level!r}")

    def lines(self) -> list[str]:
        out = [f"{self.level:<4}  {self.name}: {self.summary}"]
        if self.fix and self.level in (WARN, FAIL):
            out.append(f"      fix: {self.fix}")
        return out


# --------------------------------------------------------------------------------------------
# iptables -S listings
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class IptRule:
    """One ``-A CHAIN ...`` line of ``iptables -S`` (counters ``-c P B`` taken out)."""

    chain: str
    args: tuple[str, ...]
    packets: int | None
    line: str

    @property
    def target(self) -> str | None:
        for flag in ("-j", "-g"):
            v = self.value(flag)
            if v is not None:
                return v
        return None

    def value(self, flag: str) -> str | None:
        a = self.args
        for i, tok in enumerate(a[:-1]):
            if tok == flag:
                return a[i + 1]
        return None

    def negated(self, flag: str) -> bool:
        a = self.args
        return any(tok == flag and i > 0 and a[i - 1] == "!" for i, tok in enumerate(a))

    def show(self) -> str:
        return " ".join(["-A", self.chain, *(shlex.quote(t) for t in self.args)])


@dataclass(frozen=True)
class IptTable:
    chains: Mapping[str, tuple[IptRule, ...]]   # every chain, built-in and user, rules in order
    user_chains: frozenset[str]

    def rules(self, chain: str) -> tuple[IptRule, ...]:
        return self.chains.get(chain, ())

    def all_rules(self) -> Iterable[IptRule]:
        for rules in self.chains.values():
            yield from rules

    def reachable(self, start: str) -> list[IptRule]:
        """Rules a packet entering ``start`` can meet, following jumps into user chains."""
        out: list[IptRule] = []
        seen: set[str] = set()

        def walk(chain: str) -> None:
            if chain in seen:
                return
            seen.add(chain)
            for r in self.rules(chain):
                out.append(r)
                if r.target in self.user_chains:
                    walk(r.target)
        walk(start)
        return out


def parse_iptables_save(text: str) -> IptTable:
    chains: dict[str, list[IptRule]] = {}
    user: set[str] = set()
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        try:
            tok = shlex.split(line)
        except ValueError:
            tok = line.split()
        if len(tok) >= 2 and tok[0] == "-P":
            chains.setdefault(tok[1], [])
        elif len(tok) >= 2 and tok[0] == "-N":
            chains.setdefault(tok[1], [])
            user.add(tok[1])
        elif len(tok) >= 2 and tok[0] == "-A":
            args, packets = _strip_counters(tok[2:])
            chains.setdefault(tok[1], []).append(IptRule(tok[1], tuple(args), packets, line))
    return IptTable({k: tuple(v) for k, v in chains.items()}, frozenset(user))


def _strip_counters(args: list[str]) -> tuple[list[str], int | None]:
    """Take ``-c PACKETS BYTES`` (``iptables -S -v``) out of a rule's arguments."""
    out: list[str] = []
    packets = None
    i = 0
    while i < len(args):
        if args[i] == "-c" and i + 2 < len(args) and args[i + 1].isdigit() and args[i + 2].isdigit():
            packets = int(args[i + 1])
            i += 3
            continue
        out.append(args[i])
        i += 1
    return out, packets


def _int(v: str | None) -> int | None:
    if v is None:
        return None
    try:
        return int(v, 0)
    except ValueError:
        return None


def _mark_value(v: str | None) -> int | None:
    """``0x2/0xffffffff`` or ``0x2`` -> 2."""
    return None if v is None else _int(v.split("/", 1)[0])


def is_restore(r: IptRule) -> bool:
    return r.target == "CONNMARK" and "--restore-mark" in r.args


def is_connmark_set(r: IptRule) -> bool:
    return r.target == "CONNMARK" and ("--set-xmark" in r.args or "--set-mark" in r.args)


def is_mark_set(r: IptRule) -> bool:
    return r.target == "MARK" and ("--set-xmark" in r.args or "--set-mark" in r.args)


def set_mark_of(r: IptRule) -> int | None:
    return _mark_value(r.value("--set-xmark") or r.value("--set-mark"))


def has_zero_mark_guard(r: IptRule) -> bool:
    """``-m mark --mark 0/MASK``: the plugin's guard that keeps a mark someone already set."""
    return r.value("--mark") is not None and not r.negated("--mark") and _mark_value(r.value("--mark")) == 0


def _source_net(r: IptRule):
    s = r.value("-s")
    if s is None or r.negated("-s"):
        return None
    try:
        return ipaddress.ip_network(s, strict=False)
    except ValueError:
        return None


_RULE_FLAGS_WITH_VALUE = {"-p", "-m", "--sport", "--dport", "--mark", "--dir", "--pol", "--comment", "-j",
                          "--queue-num", "--set-xmark"}


def _value_mask(val: str) -> tuple[int | None, int | None]:
    """``0x2/0xff`` -> (2, 0xff); ``0x2`` -> (2, 0xffffffff) (iptables leaves out a full mask)."""
    v, slash, m = val.partition("/")
    return _int(v), (_int(m) if slash else 0xFFFFFFFF)


def _one_bit(v: int | None) -> bool:
    return v is not None and 0 < v <= 0xFFFFFFFF and not v & (v - 1)


def rule_from_listing(r: IptRule) -> tuple[Rule | None, str]:
    """Read a listed rule back into a :class:`~l2tp_marker.rules.Rule`; (None, why) if it holds
    anything a marker rule never has.

    Mark matches: ``! --mark 0x0/MASK`` is the non-zero mark match, ``! --mark BIT/BIT`` (one bit)
    the kernel fast path's "not handled by the fast path" match; ``-j MARK --set-xmark 0x0/BITS``
    is the rule that clears the fast path's bit.
    """
    kw: dict[str, Any] = {"chain": r.chain, "protocol": None, "comment": None}
    a = list(r.args)
    i = 0
    neg = False
    pol = {}
    while i < len(a):
        tok = a[i]
        if tok == "!":
            neg = True
            i += 1
            continue
        if tok == "--queue-bypass":
            kw["queue_bypass"] = True
            i += 1
            continue
        if tok not in _RULE_FLAGS_WITH_VALUE or i + 1 >= len(a):
            return None, f"unexpected {' '.join(a[i:i + 2])!r}"
        val = a[i + 1]
        if tok == "-p":
            kw["protocol"] = val
        elif tok == "-m":
            pass
        elif tok in ("--sport", "--dport"):
            if neg or _int(val) is None:
                return None, f"unexpected {tok} {val}"
            kw[tok[2:]] = int(val, 0)
        elif tok == "--mark":
            v, mask = _value_mask(val)
            if neg and v == 0 and mask and "mark_nonzero_mask" not in kw:
                kw["mark_nonzero_mask"] = mask
            elif neg and _one_bit(v) and v == mask and "bit_clear" not in kw:
                kw["bit_clear"] = v
            else:
                return None, f"unexpected mark match {'! ' if neg else ''}{val}"
        elif tok in ("--dir", "--pol"):
            pol[tok] = val
        elif tok == "--comment":
            kw["comment"] = val
        elif tok == "-j":
            kw["target"] = val
        elif tok == "--queue-num":
            kw["queue_num"] = _int(val)
        elif tok == "--set-xmark":
            v, mask = _value_mask(val)
            if kw.get("target") != "MARK" or neg or v != 0 or not mask:
                return None, f"unexpected --set-xmark {val} (the marker only clears bits: 0x0/BITS)"
            kw["clear_bits"] = mask
        neg = False
        i += 2
    if pol:
        if pol != {"--dir": "in", "--pol": "ipsec"}:
            return None, "unexpected policy match"
        kw["ipsec_in"] = True
    if "target" not in kw:
        return None, "no target"
    if kw["target"] == "MARK" and "clear_bits" not in kw:
        return None, "MARK without --set-xmark 0x0/BITS"
    return Rule(**kw), ""


_FIELD_WORDS = {
    "protocol": "protocol", "sport": "source port", "dport": "destination port",
    "mark_nonzero_mask": "non-zero mark match (mask)",
    "bit_clear": "fast-path bit match ('! --mark BIT/BIT')", "ipsec_in": "IPsec policy match",
    "queue_num": "queue number", "queue_bypass": "--queue-bypass", "comment": "comment",
    "target": "target", "clear_bits": "bits cleared (MARK --set-xmark 0x0/BITS)",
}
_MARK_FIELDS = {"mark_nonzero_mask", "bit_clear", "clear_bits"}


def describe_difference(have: Rule, want: Rule) -> str:
    parts = []
    for name, words in _FIELD_WORDS.items():
        h, w = getattr(have, name), getattr(want, name)
        if h != w:
            hex_ = name in _MARK_FIELDS
            parts.append(f"{words} {_show(h, hex_)} instead of {_show(w, hex_)}")
    return ", ".join(parts) or "differs"


def _show(v: Any, hex_: bool = False) -> str:
    if isinstance(v, bool):
        return "yes" if v else "no"
    if v is None:
        return "none"
    if isinstance(v, int) and (hex_ or v > 0xFFFF):
        return f"{v:#x}"
    return str(v)


def _rule_text(rule: Rule) -> str:
    return " ".join(["-A", rule.chain, *rule.argv()])


def chain_problems(want: list[Rule], have: tuple[IptRule, ...], chain: str) -> list[str]:
    """How the listed rules of ``chain`` differ from ``want`` (empty: the same rules in the same
    order). Rules are matched exactly first, wherever they are; a wanted rule without an exact
    match is compared with the first unmatched listed rule with its target."""
    parsed = [rule_from_listing(h) for h in have]
    if [p for p, _ in parsed] == want:
        return []
    used_have: set[int] = set()
    match: dict[int, int] = {}        # want index -> have index (exact)
    for wi, w in enumerate(want):
        for hi, (p, _) in enumerate(parsed):
            if hi not in used_have and p == w:
                match[wi] = hi
                used_have.add(hi)
                break
    problems: list[str] = []
    for wi, w in enumerate(want):
        if wi in match:
            continue
        near = next((hi for hi, (p, _) in enumerate(parsed)
                     if hi not in used_have and p is not None and p.target == w.target), None)
        if near is None:
            problems.append(f"{chain} lacks '{_rule_text(w)}'")
            continue
        used_have.add(near)
        match[wi] = near
        problems.append(f"{chain} rule {near + 1}: {describe_difference(parsed[near][0], w)}")
    for hi, (p, why) in enumerate(parsed):
        if hi in used_have:
            continue
        if p is None:
            problems.append(f"{chain} rule {hi + 1} '{have[hi].show()}': {why}")
        else:
            problems.append(f"{chain} has an extra rule '{have[hi].show()}'")
    order = [match[wi] for wi in sorted(match)]
    if not problems and order != sorted(order):
        problems.append(f"{chain} holds the expected rules in another order: "
                        + ", ".join(f"'{_rule_text(w)}' is rule {match[wi] + 1}" for wi, w in enumerate(want)))
    return problems


# --------------------------------------------------------------------------------------------
# ip xfrm
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class XfrmState:
    src: str
    dst: str
    proto: str
    spi: str
    reqid: int | None
    mode: str
    mark: int | None
    mark_mask: int | None


@dataclass(frozen=True)
class XfrmPolicy:
    src: str
    dst: str
    direction: str
    mark: int | None
    mark_mask: int | None
    selector: str


def _blocks(text: str) -> list[list[str]]:
    """``ip xfrm`` prints one object per block: a line at column 0, then indented lines."""
    blocks: list[list[str]] = []
    for line in text.splitlines():
        if not line.strip():
            continue
        if not line[0].isspace() and line.startswith("src "):
            blocks.append([line.strip()])
        elif blocks:
            blocks[-1].append(line.strip())
    return blocks


def _kv(tokens: list[str], key: str) -> str | None:
    for i, tok in enumerate(tokens[:-1]):
        if tok == key:
            return tokens[i + 1]
    return None


def _parse_mark(lines: list[str]) -> tuple[int | None, int | None]:
    for line in lines:
        tok = line.split()
        if tok and tok[0] == "mark" and len(tok) > 1:
            v, _, m = tok[1].partition("/")
            return _int(v), (_int(m) if m else 0xFFFFFFFF)
    return None, None


def parse_xfrm_states(text: str) -> list[XfrmState]:
    out = []
    for b in _blocks(text):
        head = b[0].split()
        body = [t for line in b[1:] for t in line.split()]
        mark, mask = _parse_mark(b[1:])
        out.append(XfrmState(src=_kv(head, "src") or "?", dst=_kv(head, "dst") or "?",
                             proto=_kv(body, "proto") or "?", spi=_kv(body, "spi") or "?",
                             reqid=_int(_kv(body, "reqid")), mode=_kv(body, "mode") or "?",
                             mark=mark, mark_mask=mask))
    return out


def parse_xfrm_policies(text: str) -> list[XfrmPolicy]:
    out = []
    for b in _blocks(text):
        head = b[0].split()
        direction = None
        for line in b[1:]:
            tok = line.split()
            if tok and tok[0] == "dir" and len(tok) > 1:
                direction = tok[1]
        mark, mask = _parse_mark(b[1:])
        out.append(XfrmPolicy(src=(_kv(head, "src") or "?").split("/")[0],
                              dst=(_kv(head, "dst") or "?").split("/")[0],
                              direction=direction or "?", mark=mark, mark_mask=mask, selector=b[0]))
    return out


# --------------------------------------------------------------------------------------------
# conntrack, nfnetlink_queue, nft
# --------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class CtEntry:
    src: str
    dst: str
    sport: int
    dport: int
    mark: int | None
    line: str


def parse_conntrack(text: str) -> list[CtEntry]:
    out = []
    for line in text.splitlines():
        tok = line.split()
        if "udp" not in tok:
            continue
        first: dict[str, str] = {}
        mark = None
        for t in tok:
            k, eq, v = t.partition("=")
            if not eq:
                continue
            if k in ("src", "dst", "sport", "dport") and k not in first:
                first[k] = v
            elif k == "mark":
                mark = _int(v)
        if len(first) == 4 and _int(first["sport"]) is not None and _int(first["dport"]) is not None:
            out.append(CtEntry(first["src"], first["dst"], int(first["sport"]), int(first["dport"]),
                               mark, line.strip()))
    return out


def parse_nfqueue(text: str) -> dict[int, dict[str, int]]:
    """/proc/net/netfilter/nfnetlink_queue: queue -> portid, waiting, queue_dropped, user_dropped."""
    out: dict[int, dict[str, int]] = {}
    for line in text.splitlines():
        f = line.split()
        if len(f) >= 7 and all(x.isdigit() for x in f[:7]):
            out[int(f[0])] = {"portid": int(f[1]), "waiting": int(f[2]), "queue_dropped": int(f[5]),
                              "user_dropped": int(f[6])}
    return out


@dataclass(frozen=True)
class NftChain:
    table: str          # "ip mangle"
    name: str
    hook: str | None    # "type route hook output ..." -> "route output"
    statements: tuple[str, ...]


def parse_nft_ruleset(text: str) -> list[NftChain]:
    """Chains of ``nft list ruleset`` (enough to find route chains and what they do)."""
    chains: list[NftChain] = []
    table = None
    chain = None
    hook = None
    stmts: list[str] = []
    depth = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("table ") and line.endswith("{"):
            table = " ".join(line.split()[1:-1])
            depth = 1
            continue
        if line.startswith("chain ") and line.endswith("{") and table is not None:
            chain, hook, stmts = line.split()[1], None, []
            depth = 2
            continue
        if line == "}":
            if depth == 2 and chain is not None:
                chains.append(NftChain(table or "?", chain, hook, tuple(stmts)))
                chain = None
            depth = max(0, depth - 1)
            continue
        if chain is not None:
            m = re.match(r"type (\w+) hook (\w+)", line)
            if m:
                hook = f"{m[1]} {m[2]}"
            else:
                stmts.append(line)
    return chains


@dataclass(frozen=True)
class NftTableChain:
    name: str
    hook: str | None        # "route output"
    priority: int | None    # "priority mangle - 10" -> -160
    statements: tuple[str, ...]


@dataclass(frozen=True)
class NftTable:
    name: str                                  # "ip l2tp_marker"
    chains: Mapping[str, NftTableChain]
    sets: frozenset[str]                       # sets and maps


_NFT_PRIORITIES = {"raw": -300, "mangle": -150, "dstnat": -100, "filter": 0, "security": 50, "srcnat": 100}


def nft_priority(text: str) -> int | None:
    """``mangle - 10`` -> -160, ``-160`` -> -160 (the ip family's named priorities)."""
    m = re.fullmatch(r"\s*(?:(\w+)\s*(?:([+-])\s*(\d+))?|(-?\d+))\s*", text)
    if not m:
        return None
    if m[4] is not None:
        return int(m[4])
    if m[1].lstrip("-").isdigit():
        return int(m[1])
    base = _NFT_PRIORITIES.get(m[1])
    if base is None:
        return None
    off = int(m[3]) if m[3] else 0
    return base - off if m[2] == "-" else base + off


def parse_nft_tables(text: str) -> dict[str, NftTable]:
    """Tables of ``nft [-t] list ruleset`` (or ``nft list tables``): their chains and sets."""
    tables: dict[str, dict] = {}
    cur: str | None = None
    chain: str | None = None
    lines: list[str] = []
    depth = 0
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        words = line.split()
        if depth == 0 and words[0] == "table" and len(words) >= 3:
            cur = " ".join(w for w in words[1:] if w != "{")
            tables.setdefault(cur, {"chains": {}, "sets": set()})
        elif depth == 1 and cur is not None and line.endswith("{") and len(words) >= 3:
            if words[0] == "chain":
                chain, lines = words[1], []
            elif words[0] in ("set", "map"):
                tables[cur]["sets"].add(words[1])
        elif depth == 2 and chain is not None:
            lines.append(line)
        depth = max(0, depth + line.count("{") - line.count("}"))
        if chain is not None and depth <= 1:
            hook = prio = None
            stmts = []
            for st in lines:
                m = re.match(r"type (\w+) hook (\w+)(?: device \S+)? priority ([^;]+);", st)
                if m:
                    hook, prio = f"{m[1]} {m[2]}", nft_priority(m[3])
                elif not st.startswith("policy ") and st != "}":
                    stmts.append(st)
            tables[cur]["chains"][chain] = NftTableChain(chain, hook, prio, tuple(stmts))
            chain = None
        if depth == 0:
            cur = None if line.endswith("}") else cur
    return {k: NftTable(k, dict(v["chains"]), frozenset(v["sets"])) for k, v in tables.items()}


_NFT_QUEUE_RE = re.compile(r'(^|\s)queue(\s|$)|xt target "NFQUEUE"')
_NFT_MARK_RE = re.compile(r'(^|\s)(meta )?mark set\s|xt target "(CONNMARK|MARK)"')


# --------------------------------------------------------------------------------------------
# Which rules to expect
# --------------------------------------------------------------------------------------------
_PARAM_WORDS = {"prefix": "chain prefix", "queue_in": "inbound queue", "queue_out": "outbound queue",
                "mark_mask": "mark_mask", "inbound_match": "inbound_match"}


def _params_of(rs: RuleSet) -> dict[str, Any] | None:
    """The :func:`~l2tp_marker.rules.build_rules` arguments that give ``rs`` (without the fast path)."""
    if len(rs.chains) != 2 or not rs.chains[0].endswith("-IN"):
        return None
    chain_in, chain_out = rs.chains
    q_in = next((r for r in rs.rules if r.chain == chain_in and r.target == "NFQUEUE"), None)
    q_out = next((r for r in rs.rules if r.chain == chain_out and r.target == "NFQUEUE"), None)
    if q_in is None or q_out is None:
        return None
    return {"prefix": chain_in[:-3], "queue_in": q_in.queue_num, "queue_out": q_out.queue_num,
            "mark_mask": q_in.mark_nonzero_mask if q_in.mark_nonzero_mask is not None else 0xFFFFFFFF,
            "inbound_match": "ipsec" if q_in.ipsec_in else "none"}


def _daemon_params(status: Mapping[str, Any]) -> dict[str, Any]:
    """The rule parameters the daemon reports about itself (those it reports)."""
    d = status.get("daemon")
    out: dict[str, Any] = {}
    if not isinstance(d, Mapping):
        return out
    chains = d.get("chains")
    if isinstance(chains, (list, tuple)) and len(chains) == 2 and str(chains[0]).endswith("-IN"):
        out["prefix"] = str(chains[0])[:-3]
    q = d.get("queues")
    if isinstance(q, Mapping):
        for k in ("in", "out"):
            if isinstance(q.get(k), int):
                out[f"queue_{k}"] = q[k]
    if isinstance(d.get("mark_mask"), int):
        out["mark_mask"] = d["mark_mask"]
    if d.get("inbound_match") in ("ipsec", "none"):
        out["inbound_match"] = d["inbound_match"]
    return out


def _fastpath_status(f: Facts) -> Mapping[str, Any] | None:
    """The daemon's ``fastpath`` status (None: no daemon answers, or it reports none)."""
    if not _daemon_answers(f):
        return None
    st = f.status.get("fastpath")
    return st if isinstance(st, Mapping) else None


@dataclass(frozen=True)
class Expected:
    """The marker's rules doctor expects: one form when the daemon says which it runs, else both
    (with and without the kernel fast path), the more likely first."""

    forms: tuple[tuple[str, RuleSet], ...]   # (label, rule set)
    bit: int                                 # the fast-path bit (of the daemon, else of the config)
    from_daemon: bool                        # the daemon's status chose the form and the parameters
    notes: tuple[str, ...] = ()              # where the daemon's values replaced doctor's

    @property
    def ruleset(self) -> RuleSet:
        return self.forms[0][1]

    @property
    def prefix(self) -> str:
        return self.ruleset.chains[0][:-3]

    def source(self) -> str:
        """How the expectation was chosen, for the checks' text."""
        if not self.from_daemon:
            return "the daemon does not answer, so either form is accepted"
        s = "as the daemon reports"
        if self.notes:
            s += " (its " + ", ".join(self.notes) + ")"
        return s


def _form_label(bit: int | None) -> str:
    return f"the kernel fast-path form (bit {bit:#x})" if bit is not None else "the form without the fast path"


def expected_rules(f: Facts) -> Expected | None:
    """What the marker's chains should hold. When the daemon answers, its own status decides (the
    fast path's mode and bit, its chains, queues, inbound_match and mark_mask) over doctor's
    options; otherwise both forms of doctor's configuration are acceptable."""
    base = _params_of(f.ruleset) if f.ruleset is not None else None
    cfg_bit = f.fastpath_bit if _one_bit(f.fastpath_bit) else DEFAULT_BIT
    if _daemon_answers(f):
        params = dict(base or {})
        notes = []
        for k, v in _daemon_params(f.status).items():
            if base is not None and base.get(k) != v:
                notes.append(f"{_PARAM_WORDS[k]} {_show(v, k == 'mark_mask')}, not doctor's "
                             f"{_show(base.get(k), k == 'mark_mask')}")
            params[k] = v
        if set(params) == set(_PARAM_WORDS):
            st = _fastpath_status(f)
            bit = None
            if st is not None and st.get("mode") == "kernel":
                bit = st.get("bit") if _one_bit(st.get("bit")) else cfg_bit
            rs = build_rules(**params, fastpath_bit=bit)
            return Expected(((_form_label(bit), rs),), bit or cfg_bit, True, tuple(notes))
    if base is None:
        return None
    with_fp = (_form_label(cfg_bit), build_rules(**base, fastpath_bit=cfg_bit))
    without = (_form_label(None), build_rules(**base))
    forms = (without, with_fp) if f.fastpath_setting == "off" else (with_fp, without)
    return Expected(forms, cfg_bit, False)


def _rules_problems(rs: RuleSet, legacy: IptTable) -> tuple[list[str], list[str]]:
    """(missing chains, problems) of the legacy table against the rule set ``rs``."""
    missing = [c for c in rs.chains if c not in legacy.user_chains]
    problems = [f"chain {c} is missing" for c in missing]
    for chain in rs.chains:
        if chain not in missing:
            problems += chain_problems([r for r in rs.rules if r.chain == chain], legacy.rules(chain), chain)
    return missing, problems


# --------------------------------------------------------------------------------------------
# The checks
# --------------------------------------------------------------------------------------------
def diagnose(f: Facts) -> list[Check]:
    """Every check, in a stable order (the order the report prints)."""
    legacy = parse_iptables_save(f.legacy_mangle.text) if f.legacy_mangle.ok else None
    nft = parse_iptables_save(f.nft_mangle.text) if f.nft_mangle.ok else None
    states = parse_xfrm_states(f.xfrm_state.text) if f.xfrm_state.ok else None
    exp = expected_rules(f)
    checks = [
        check_xl2tpd(f),
        check_xl2tpd_saref(f),
        check_connmark_plugin(f, legacy, nft),
        check_ipsec_sa_marks(f, states),
        check_ipsec_policy_marks(f, states),
        check_marker_rules(f, legacy, exp),
        check_queue_bypass(f, legacy, nft, exp),
        check_marker_jumps(f, legacy, exp),
        check_rule_order(f, legacy, exp),
        check_fastpath(f, legacy, exp),
        check_fastpath_bit(f, legacy, nft, states, exp),
        check_nft_route_pitfall(f, nft),
        check_rp_filter(f),
        check_conntrack_merge(f, legacy, states),
        check_tunnel_ids(f),
        check_daemon(f),
        check_daemon_queues(f),
    ]
    if f.status is not None and "error" not in f.status:
        checks.append(check_daemon_rules(f))
    return checks


def exit_code(checks: Iterable[Check]) -> int:
    return 1 if any(c.level == FAIL for c in checks) else 0


def _where(f: Facts) -> str:
    return f"in namespace {f.netns}" if f.netns else "on this host"


def _daemon_answers(f: Facts) -> bool:
    return f.status is not None and "error" not in f.status


# -- xl2tpd -----------------------------------------------------------------------------------
def check_xl2tpd(f: Facts) -> Check:
    name = "xl2tpd"
    if not f.xl2tpd:
        return Check(name, FAIL, f"xl2tpd is not running {_where(f)}: no LNS answers L2TP",
                     "start it (systemctl start xl2tpd), after strongSwan and l2tp-marker")
    procs = ", ".join(f"pid {p.pid} (config {p.config_path})" for p in f.xl2tpd)
    if len(f.xl2tpd) > 1:
        return Check(name, WARN, f"{len(f.xl2tpd)} xl2tpd processes: {procs}; only one can own udp/1701",
                     "stop the extra instances by PID, keep the one systemd started")
    return Check(name, PASS, f"running: {procs}")


def parse_xl2tpd_conf(text: str) -> dict[str, dict[str, str]]:
    """xl2tpd.conf: ``[section]`` headers and ``key = value`` lines; ``;`` and ``#`` comment."""
    out: dict[str, dict[str, str]] = {}
    section = "global"
    for raw in text.splitlines():
        line = raw.split(";", 1)[0].split("#", 1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            section = " ".join(line[1:-1].split()).lower()
            out.setdefault(section, {})
            continue
        k, eq, v = line.partition("=")
        if eq:
            out.setdefault(section, {})[" ".join(k.split()).lower()] = v.strip()
    return out


def check_xl2tpd_saref(f: Facts) -> Check:
    name = "xl2tpd-saref"
    if not f.xl2tpd_configs:
        return Check(name, INFO, "no xl2tpd configuration found to check (give one with --xl2tpd-config)")
    bad, unread, good = [], [], []
    for cf in f.xl2tpd_configs:
        label = f"{cf.path}" + (f" ({cf.source})" if cf.source else "")
        if cf.text is None:
            unread.append(f"{label}: {cf.error or 'unreadable'}")
            continue
        conf = parse_xl2tpd_conf(cf.text)
        vals = [sec["ipsec saref"] for sec in conf.values() if "ipsec saref" in sec]
        if any(v.lower() in _TRUE for v in vals):
            bad.append(label)
        else:
            good.append(label)
    if bad:
        return Check(name, FAIL, f"'ipsec saref = yes' in {', '.join(bad)}: SAref needs the long-gone "
                                 "KLIPS kernel; on a stock kernel xl2tpd mishandles sockets and the "
                                 "marker cannot work with it",
                     "set 'ipsec saref = no' in [global] and restart xl2tpd")
    if unread:
        return Check(name, WARN, "cannot read " + "; ".join(unread),
                     "run doctor as root, or give the configuration with --xl2tpd-config")
    return Check(name, PASS, f"'ipsec saref' is off in {', '.join(good)}")


# -- connmark plugin --------------------------------------------------------------------------
def _connmark_rules(t: IptTable) -> tuple[list[IptRule], list[IptRule]]:
    return ([r for r in t.rules("INPUT") if is_connmark_set(r)],
            [r for r in t.rules("OUTPUT") if is_restore(r)])


def _marks(rules: Iterable[IptRule]) -> str:
    ms = sorted({m for m in (set_mark_of(r) for r in rules) if m is not None})
    return ", ".join(f"{m:#x}" for m in ms) or "none"


def check_connmark_plugin(f: Facts, legacy: IptTable | None, nft: IptTable | None) -> Check:
    name = "connmark-plugin"
    fix_load = ("load strongSwan's connmark plugin (libcharon-extra-plugins; "
                "charon.plugins.connmark.load = yes) and give the CHILD_SA 'mark = %unique'")
    if legacy is None:
        return Check(name, WARN, f"cannot read the legacy mangle table: {f.legacy_mangle.why()}",
                     "run doctor as root with iptables-legacy installed (apt-get install iptables)")
    l_in, l_out = _connmark_rules(legacy)
    n_in, n_out = _connmark_rules(nft) if nft is not None else ([], [])
    if l_in and l_out:
        unguarded = [r for r in l_out if not has_zero_mark_guard(r)]
        base = (f"legacy mangle holds {len(l_in)} INPUT CONNMARK --set-xmark (marks {_marks(l_in)}) "
                f"and {len(l_out)} OUTPUT --restore-mark rule(s)")
        if unguarded:
            return Check(name, WARN, base + f"; {len(unguarded)} restore rule(s) lack the "
                                            "'-m mark --mark 0' guard and overwrite marks already set",
                         "let the connmark plugin manage these rules (it adds the guard); remove "
                         "hand-made restore rules")
        extra = "; the nft-based tables hold CONNMARK rules too" if (n_in or n_out) else ""
        return Check(name, PASS, base + extra)
    if l_in and not l_out:
        return Check(name, WARN, f"legacy INPUT has the plugin's CONNMARK --set-xmark rules (marks "
                                 f"{_marks(l_in)}) but OUTPUT has no --restore-mark: replies leave "
                                 "without the client's mark unless the marker sets it",
                     "re-establish the IPsec SAs (or restart strongSwan) so the plugin adds its rules "
                     "again, and find what flushed mangle OUTPUT (a firewall reload?)")
    if l_out and not l_in:
        return Check(name, WARN, f"legacy OUTPUT has {len(l_out)} CONNMARK --restore-mark rule(s) but "
                                 "INPUT has no CONNMARK --set-xmark: conntrack never gets a mark to "
                                 "restore",
                     "re-establish the IPsec SAs (or restart strongSwan) so the plugin adds its rules "
                     "again, and find what flushed mangle INPUT")
    if n_in or n_out:
        return Check(name, WARN, f"CONNMARK rules only in the nft-based tables (iptables-nft: "
                                 f"{len(n_in)} INPUT set, {len(n_out)} OUTPUT restore), not in legacy "
                                 "where the plugin (libiptc) and the marker put theirs: legacy and nft "
                                 "hooks at one priority run in reverse registration order, so the "
                                 "restore may run after the marker",
                     "let the connmark plugin install them (legacy), and remove the iptables-nft copies")
    if nft is None:
        return Check(name, WARN, "no connmark plugin rules in legacy mangle (nft-based tables not "
                                 f"readable: {f.nft_mangle.why()}): clients' return traffic has no "
                                 "mark unless marked otherwise", fix_load)
    return Check(name, WARN, "no connmark plugin rules (CONNMARK in mangle INPUT/OUTPUT) in legacy or "
                             "nft tables: clients' return traffic has no mark unless marked otherwise",
                 fix_load)


# -- IPsec ------------------------------------------------------------------------------------
def _sa_pairs(states: list[XfrmState]) -> tuple[list[tuple[XfrmState, XfrmState]], list[XfrmState]]:
    """Pair SAs of one CHILD_SA: same reqid, addresses swapped."""
    pairs, used = [], set()
    for i, a in enumerate(states):
        if i in used:
            continue
        for j in range(i + 1, len(states)):
            b = states[j]
            if j not in used and a.reqid == b.reqid and a.src == b.dst and a.dst == b.src:
                pairs.append((a, b))
                used.update((i, j))
                break
    return pairs, [s for i, s in enumerate(states) if i not in used]


def _m(v: int | None) -> str:
    return "none" if v is None else f"{v:#x}"


def check_ipsec_sa_marks(f: Facts, states: list[XfrmState] | None) -> Check:
    name = "ipsec-sa-marks"
    if states is None:
        return Check(name, WARN, f"cannot read 'ip xfrm state': {f.xfrm_state.why()}",
                     "run doctor as root with iproute2 installed")
    if not states:
        return Check(name, INFO, "no IPsec SAs (no client connected, or no IPsec here: the lab has none)")
    pairs, single = _sa_pairs(states)
    unequal = [(a, b) for a, b in pairs if a.mark != b.mark]
    unmarked = [(a, b) for a, b in pairs if a.mark is None and b.mark is None]
    if unequal:
        desc = "; ".join(f"reqid {a.reqid} {a.src}->{a.dst} mark {_m(a.mark)}, {b.src}->{b.dst} mark "
                         f"{_m(b.mark)}" for a, b in unequal)
        return Check(name, FAIL, f"in and out marks differ: {desc}; the marker returns traffic with the "
                                 "inbound mark, which then selects no outbound SA",
                     "use 'mark = %unique' (or equal mark_in and mark_out) in the CHILD_SA and "
                     "re-establish it")
    by_mark: dict[tuple[frozenset[str], int], int] = {}
    for a, _b in pairs:
        if a.mark is not None:
            key = (frozenset((a.src, a.dst)), a.mark)
            by_mark[key] = by_mark.get(key, 0) + 1
    shared = [k for k, n in by_mark.items() if n > 1]
    if unmarked:
        return Check(name, WARN, f"{len(unmarked)} SA pair(s) without a mark (of {len(pairs)}): clients "
                                 "behind one NAT cannot be told apart, replies follow one SA",
                     "set 'mark = %unique' in the CHILD_SA and load the connmark plugin")
    if shared:
        return Check(name, WARN, "several SA pairs share one mark: " + ", ".join(
            f"mark {m:#x}" for _p, m in shared) + "; replies cannot pick the right SA",
                     "use 'mark = %unique' so every CHILD_SA gets its own mark")
    extra = f"; {len(single)} SA(s) without a partner" if single else ""
    return Check(name, PASS, f"{len(pairs)} SA pair(s), in and out marks equal (marks "
                             f"{', '.join(sorted({_m(a.mark) for a, _b in pairs}))}){extra}")


def check_ipsec_policy_marks(f: Facts, states: list[XfrmState] | None) -> Check:
    name = "ipsec-policy-marks"
    if not f.xfrm_policy.ok:
        return Check(name, WARN, f"cannot read 'ip xfrm policy': {f.xfrm_policy.why()}",
                     "run doctor as root with iproute2 installed")
    pols = [p for p in parse_xfrm_policies(f.xfrm_policy.text) if p.direction in ("in", "out", "fwd")]
    if not pols:
        return Check(name, INFO, "no IPsec policies (no client connected, or no IPsec here: the lab has none)")
    out_marks = {(p.mark, p.mark_mask) for p in pols if p.direction == "out" and p.mark is not None}
    sa_marks = sorted({s.mark for s in (states or []) if s.mark is not None})
    missing = [m for m in sa_marks if not any(pm is not None and (m & (mask or 0xFFFFFFFF)) == pm
                                              for pm, mask in out_marks)]
    marked = [p for p in pols if p.mark is not None]
    if sa_marks and missing:
        return Check(name, WARN, "no outbound policy carries SA mark(s) "
                                 + ", ".join(f"{m:#x}" for m in missing)
                                 + ": a packet with that mark matches no policy and leaves unencrypted "
                                   "or is dropped",
                     "give the CHILD_SA 'mark = %unique' (strongSwan puts the mark on its policies) "
                     "and re-establish it")
    if not marked:
        return Check(name, INFO, f"{len(pols)} polic(ies), none with a mark")
    return Check(name, PASS, f"{len(pols)} polic(ies), {len(marked)} with marks "
                             + ", ".join(sorted({_m(p.mark) for p in marked})))


# -- the marker's rules -----------------------------------------------------------------------
def _no_table(f: Facts) -> str:
    return f"cannot read the legacy mangle table: {f.legacy_mangle.why()}"


def check_marker_rules(f: Facts, legacy: IptTable | None, exp: Expected | None = None) -> Check:
    name = "marker-rules"
    exp = expected_rules(f) if exp is None else exp
    if exp is None:
        return Check(name, INFO, "no marker configuration given: rules not checked")
    if legacy is None:
        return Check(name, FAIL, _no_table(f), "run doctor as root with iptables-legacy installed")
    fix = ("restart l2tp-marker: it installs its rules on start (a running daemon puts damaged rules back "
           "within repair_interval seconds)")
    chains = exp.ruleset.chains
    results = [(label, *_rules_problems(rs, legacy)) for label, rs in exp.forms]
    if all(len(missing) == len(chains) for _label, missing, _p in results):
        return Check(name, FAIL, f"the marker's chains {', '.join(chains)} are not in legacy mangle: "
                                 "nothing judges L2TP, replies follow plain connmark", fix)
    for label, _missing, problems in results:
        if not problems:
            return Check(name, PASS, f"chains {', '.join(chains)} hold the expected rules: {label}, "
                                     f"{exp.source()}")
    # The closest form (fewest problems; the more likely one on a tie) explains what differs.
    label, missing, problems = min(results, key=lambda r: len(r[2]))
    what = "; ".join(problems)
    if len(exp.forms) > 1:
        what = f"neither form matches; against {label}: {what}"
    else:
        what = f"against {label}, {exp.source()}: {what}"
    if _daemon_answers(f) and not f.status.get("rule_problems") and not missing:
        return Check(name, WARN, what + " (the daemon finds its rules intact: doctor expects another "
                                        "configuration than the daemon's)",
                     "run doctor with the daemon's --config, or the same --inbound-match/--queue-in/"
                     "--queue-out/--chain-prefix/--fastpath as `run`")
    return Check(name, FAIL, what, fix)


def check_queue_bypass(f: Facts, legacy: IptTable | None, nft: IptTable | None,
                       exp: Expected | None = None) -> Check:
    name = "queue-bypass"
    exp = expected_rules(f) if exp is None else exp
    rs = exp.ruleset if exp is not None else None
    ours = set(rs.chains) if rs else set()
    queues = {r.queue_num for r in rs.rules if r.queue_num is not None} if rs else set()
    found: list[tuple[str, IptRule]] = []
    for label, t in (("legacy", legacy), ("iptables-nft", nft)):
        if t is None:
            continue
        for r in t.all_rules():
            if r.target != "NFQUEUE":
                continue
            q = _int(r.value("--queue-num")) or 0
            if r.chain in ours or q in queues or r.value("--sport") == str(L2TP_PORT) \
                    or r.value("--dport") == str(L2TP_PORT):
                found.append((label, r))
    if legacy is None and nft is None:
        return Check(name, WARN, _no_table(f), "run doctor as root with iptables installed")
    bad = [(label, r) for label, r in found if "--queue-bypass" not in r.args]
    if bad:
        return Check(name, FAIL, "NFQUEUE rule(s) without --queue-bypass: "
                                 + "; ".join(f"{label} '{r.show()}'" for label, r in bad)
                                 + ": with the daemon stopped the kernel drops every packet they queue, "
                                   "so L2TP dies with the daemon",
                     "restart l2tp-marker (its rules always carry --queue-bypass); remove hand-made "
                     "queue rules")
    if not found:
        return Check(name, INFO, "no NFQUEUE rules for L2TP")
    return Check(name, PASS, f"every L2TP NFQUEUE rule ({len(found)}) has --queue-bypass")


def check_marker_jumps(f: Facts, legacy: IptTable | None, exp: Expected | None = None) -> Check:
    name = "marker-jumps"
    exp = expected_rules(f) if exp is None else exp
    rs = exp.ruleset if exp is not None else None
    if rs is None:
        return Check(name, INFO, "no marker configuration given: jumps not checked")
    if legacy is None:
        return Check(name, FAIL, _no_table(f), "run doctor as root with iptables-legacy installed")
    missing, dup, odd = [], [], []
    for j in rs.jumps:
        found = [r for r in legacy.rules(j.chain) if r.target == j.target]
        if not found:
            missing.append(f"{j.chain} -> {j.target}")
        elif len(found) > 1:
            dup.append(f"{len(found)} jumps {j.chain} -> {j.target}")
        else:
            got, why = rule_from_listing(found[0])
            if got != j:
                odd.append(f"{j.chain} -> {j.target}: " + (describe_difference(got, j) if got else why))
    fix = "restart l2tp-marker (it appends exactly one jump to INPUT and to OUTPUT)"
    if missing:
        return Check(name, FAIL, f"no jump {', '.join(missing)} in legacy mangle: those packets are "
                                 "never judged", fix)
    if dup:
        return Check(name, WARN, "; ".join(dup) + " (expected one each)", fix)
    if odd:
        return Check(name, WARN, "jump differs from the marker's: " + "; ".join(odd), fix)
    return Check(name, PASS, "one jump each: " + ", ".join(f"{j.chain} -> {j.target}" for j in rs.jumps))


def check_rule_order(f: Facts, legacy: IptTable | None, exp: Expected | None = None) -> Check:
    name = "rule-order"
    exp = expected_rules(f) if exp is None else exp
    rs = exp.ruleset if exp is not None else None
    if rs is None or legacy is None:
        return Check(name, INFO, "not checked (no configuration or no legacy mangle listing)")
    bad, checked = [], []
    for j in rs.jumps:
        rules = legacy.rules(j.chain)
        jumps = [i for i, r in enumerate(rules) if r.target == j.target]
        plugin = [i for i, r in enumerate(rules)
                  if (is_connmark_set(r) if j.chain == "INPUT" else is_restore(r))]
        if not jumps or not plugin:
            continue
        checked.append(j.chain)
        if jumps[0] < max(plugin):
            below = [i + 1 for i in plugin if i > jumps[0]]
            bad.append(f"{j.chain}: the jump to {j.target} (rule {jumps[0] + 1}) comes before the "
                       f"plugin's CONNMARK rule(s) {', '.join(map(str, below))}")
    if bad:
        return Check(name, FAIL, "; ".join(bad) + ": NFQUEUE ends the chain, so those CONNMARK rules never "
                                                  "run for L2TP packets (conntrack gets no mark / replies "
                                                  "lose their SA, and with the daemon down nothing restores "
                                                  "the mark)",
                     "let the marker append its jumps (restart l2tp-marker); never insert them at the top "
                     "(-I): the plugin's rules must come first")
    if not checked:
        return Check(name, INFO, "nothing to order (no jumps or no connmark plugin rules)")
    return Check(name, PASS, f"the marker's jumps come after the plugin's CONNMARK rules in "
                             f"{' and '.join(checked)}")


# -- the kernel fast path -----------------------------------------------------------------------
_NFT_BIT_RE = re.compile(r"meta mark set meta mark \| (0x[0-9a-fA-F]+)")


def _fastpath_table(f: Facts, exp: Expected | None) -> str:
    st = _fastpath_status(f)
    if st is not None and st.get("table"):
        return str(st["table"])
    if exp is not None:
        return table_name(exp.prefix)
    prefix = _daemon_params(f.status).get("prefix") if _daemon_answers(f) else None
    return table_name(prefix or "L2TP-MARKER")


def _table_bit(t: NftTable) -> int | None:
    """The bit the table's ``in`` chain sets (``meta mark set meta mark | BIT``)."""
    for c in t.chains.values():
        for st in c.statements:
            m = _NFT_BIT_RE.search(st)
            if m and _one_bit(_int(m[1])):
                return _int(m[1])
    return None


def _with_bit(bit: int) -> str:
    m = 2 if bit == 1 else 1
    return f"{m | bit:#x} for mark {m:#x}"


def _clears_bit(legacy: IptTable, start: str, bit: int) -> bool:
    """Does a rule a packet entering ``start`` can meet clear ``bit`` (``MARK --set-xmark 0/BITS``)?"""
    for r in legacy.reachable(start):
        if r.target == "MARK" and r.value("--set-xmark") is not None:
            v, mask = _value_mask(r.value("--set-xmark"))
            if v is not None and mask is not None and not v & bit and mask & bit:
                return True
    return False


def _table_shape(t: NftTable) -> list[str]:
    """What the fast-path table lacks compared with what the daemon installs: its map and set, its
    two chains on their hooks, and in each the two rules (L=1, L=0) that use them. Other rules and
    maps (the aliased tunnels' ones, say) are the daemon's business: it checks them itself."""
    out = [f"set {n}" for n in ("out_marks", "in_known") if n not in t.sets]
    for name, hook, uses in (("out", "route output", "map @out_marks"), ("in", "filter input", "@in_known")):
        c = t.chains.get(name)
        if c is None:
            out.append(f"chain {name}")
        elif c.hook != hook or c.priority != PRIORITY:
            out.append(f"chain {name} on hook {hook} at priority {PRIORITY}")
        else:
            n = sum(1 for st in c.statements if uses in st)
            if n != 2:
                out.append(f"the 2 rules of chain {name} that use {uses.split()[-1]} (it has {n})")
    return out


def check_fastpath(f: Facts, legacy: IptTable | None, exp: Expected | None = None) -> Check:
    """The kernel fast path (nftables table ``ip l2tp_marker``): in use, fallen back, off, or left
    behind where the legacy rules that clear its bit are gone."""
    name = "fastpath"
    exp = expected_rules(f) if exp is None else exp
    st = _fastpath_status(f)
    mode = st.get("mode") if st is not None else None
    tname = _fastpath_table(f, exp)
    where = f"nftables table ip {tname}"
    tables = parse_nft_tables(f.nft_ruleset.text) if f.nft_ruleset.ok else None
    table = tables.get(f"ip {tname}") if tables is not None else None
    if table is not None:
        bit = (st.get("bit") if st is not None and _one_bit(st.get("bit")) else None) or _table_bit(table) \
            or (exp.bit if exp is not None else DEFAULT_BIT)
        remove = (f"ip netns exec {f.netns} " if f.netns else "") + f"nft delete table ip {tname}"
        if legacy is None:
            return Check(name, WARN, f"{where} is there, but legacy mangle cannot be read ({_no_table(f)}): "
                                     f"cannot tell whether the fast path's bit {bit:#x} is cleared",
                         "run doctor as root with iptables-legacy installed")
        out_ok, in_ok = _clears_bit(legacy, "OUTPUT", bit), _clears_bit(legacy, "INPUT", bit)
        crash = ("" if _daemon_answers(f) and mode == "kernel" else
                 " (a daemon that died without removing its table, and mangle flushed since?)")
        if not out_ok:
            return Check(name, FAIL, f"{where} is there (it gives outbound data of known tunnels their SA "
                                     f"mark plus the bit {bit:#x}), but nothing in legacy mangle OUTPUT "
                                     f"clears that bit{crash}: those packets are not queued and leave with "
                                     f"the SA mark plus the bit (e.g. {_with_bit(bit)}), which "
                                     "selects no SA: the known clients' tunnels die",
                         f"restart l2tp-marker (it replaces the table and installs the rules that clear "
                         f"the bit); without the daemon remove the table: {remove}")
        if not in_ok:
            return Check(name, WARN, f"{where} is there, but nothing in legacy mangle INPUT clears its bit "
                                     f"{bit:#x}{crash}: inbound data of known tunnels keeps the SA mark "
                                     f"plus the bit (e.g. {_with_bit(bit)}), so later rules and sockets "
                                     "see a mark no SA has",
                         f"restart l2tp-marker (it installs the rules that clear the bit); without the "
                         f"daemon remove the table: {remove}")
        if not _daemon_answers(f):
            return Check(name, WARN, f"{where} is there but no daemon answers: left by a daemon that did "
                                     "not exit cleanly; the kernel still marks the data of the tunnels in "
                                     "it, but its entries no longer follow the tunnels (a new tunnel with "
                                     "the same address, port and ID would get the old client's mark)",
                         f"start l2tp-marker (it replaces the table), or remove it: {remove}")
        if mode != "kernel":
            if mode is None:
                why = "it reports no fast path"
            else:
                why = f"mode {mode}" + (f": {st['reason']}" if st.get("reason") else "")
            return Check(name, WARN, f"{where} is there but the daemon does not use it ({why}): a leftover "
                                     "of another instance; its entries follow no tunnel",
                         f"remove it: {remove}")
        lacks = _table_shape(table)
        if lacks:
            return Check(name, WARN, f"the daemon uses {where}, but it lacks {', '.join(lacks)}: those "
                                     "packets take the per-packet path until the daemon reinstalls it",
                         "wait repair_interval seconds (the daemon reinstalls it), and find what changes "
                         "the table (an 'nft flush ruleset' or 'nft -f' in a firewall reload?)")
        return Check(name, PASS, _fastpath_in_use(st, tname))
    # No table.
    if _daemon_answers(f):
        if st is None:
            return Check(name, INFO, "the daemon reports no fast path (a version before it): every L2TP "
                                     "packet is judged in userspace")
        if mode == "kernel":
            if tables is None:
                return Check(name, PASS, _fastpath_in_use(st, tname)
                             + f" (from the daemon's status; nft ruleset not readable: {f.nft_ruleset.why()})")
            return Check(name, WARN, f"the daemon reports the kernel fast path, but {where} is missing: "
                                     "every L2TP packet takes the per-packet path until the daemon "
                                     "reinstalls it",
                         "wait repair_interval seconds (the daemon reinstalls it), and find what deletes the "
                         "table (an 'nft flush ruleset' in a firewall reload?)")
        if mode == "fallback":
            why = st.get("reason") or "no reason given"
            return Check(name, WARN, f"kernel fast path not available ({why}): every L2TP packet is judged "
                                     "in userspace, which costs CPU and latency with many clients",
                         "run a kernel with nf_tables (CONFIG_NF_TABLES, nft_set_hash) and install "
                         "libnftables1 (apt-get install libnftables1 nftables), then restart l2tp-marker; "
                         "or set fastpath = \"off\" in its configuration to silence this")
        return Check(name, INFO, f"kernel fast path off ({st.get('reason') or 'fastpath = off'}): every L2TP "
                                 "packet is judged in userspace")
    if tables is None:
        return Check(name, INFO, f"nft ruleset not readable ({f.nft_ruleset.why()}): fast path not checked")
    setting = f" (configuration: fastpath = {f.fastpath_setting})" if f.fastpath_setting else ""
    return Check(name, INFO, f"no {where} and no daemon answers{setting}: nothing to check")


def _fastpath_in_use(st: Mapping[str, Any] | None, tname: str) -> str:
    st = st or {}
    text = (f"kernel fast path in use: table ip {tname}, {st.get('out_entries', '?')} outbound / "
            f"{st.get('in_entries', '?')} inbound entries")
    extra = []
    if st.get("aliased_tunnels"):
        extra.append(f"{st['aliased_tunnels']} aliased tunnel(s) stay on the per-packet path")
    if "packets_out" in st or "packets_in" in st:
        extra.append(f"the kernel handled {st.get('packets_out', 0)} outbound / {st.get('packets_in', 0)} "
                     "inbound packets")
    return text + (f" ({'; '.join(extra)})" if extra else "")


def _sa_marks(f: Facts, legacy: IptTable | None, nft: IptTable | None,
              states: list[XfrmState] | None) -> list[tuple[int, str]]:
    """Every SA mark in sight, with where it was seen: xfrm states and policies, the connmark
    plugin's (and anyone's) MARK/CONNMARK set rules, the daemon's tunnels."""
    out: list[tuple[int, str]] = []
    for s_ in states or ():
        if s_.mark:
            out.append((s_.mark, f"xfrm state {s_.src}->{s_.dst} spi {s_.spi}"))
    if f.xfrm_policy.ok:
        for p in parse_xfrm_policies(f.xfrm_policy.text):
            if p.mark:
                out.append((p.mark, f"xfrm policy {p.src}->{p.dst} dir {p.direction}"))
    for label, t in (("legacy", legacy), ("iptables-nft", nft)):
        for r in t.all_rules() if t is not None else ():
            if not (is_connmark_set(r) or is_mark_set(r)):   # (the marker's own MARK rules set 0)
                continue
            m = set_mark_of(r)
            if m:
                out.append((m, f"{label} mangle '{r.show()}'"))
    if _daemon_answers(f):
        for t_ in f.status.get("tunnels", ()):
            if isinstance(t_.get("mark"), int) and t_["mark"]:
                out.append((t_["mark"], f"the daemon's tunnel {t_.get('peer')} id {t_.get('client_tid')}"))
    return out


def check_fastpath_bit(f: Facts, legacy: IptTable | None, nft: IptTable | None,
                       states: list[XfrmState] | None, exp: Expected | None = None) -> Check:
    """No SA mark may use the fast path's bit: the legacy rules take a packet with it for one the
    kernel fast path handled (never queued, bit cleared)."""
    name = "fastpath-bit"
    exp = expected_rules(f) if exp is None else exp
    st = _fastpath_status(f)
    if _daemon_answers(f):
        mode = st.get("mode") if st is not None else None
        if mode in ("kernel", "fallback"):
            bit = st.get("bit") if _one_bit(st.get("bit")) else (exp.bit if exp is not None else DEFAULT_BIT)
            level = FAIL if mode == "kernel" else WARN
            use = "the daemon uses" if mode == "kernel" else "the daemon reserves once its fast path works"
        else:
            return Check(name, INFO, "the kernel fast path is off: no mark bit is reserved")
    elif f.fastpath_setting == "off":
        return Check(name, INFO, "fastpath = off in the configuration: no mark bit is reserved")
    else:
        bit = exp.bit if exp is not None else (f.fastpath_bit if _one_bit(f.fastpath_bit) else DEFAULT_BIT)
        level, use = FAIL, "the configuration reserves"
    marks = _sa_marks(f, legacy, nft, states)
    bad = [(m, w) for m, w in marks if m & bit]
    if bad:
        shown = "; ".join(f"{m:#x} ({w})" for m, w in bad[:6])
        if len(bad) > 6:
            shown += f"; {len(bad) - 6} more"
        return Check(name, level, f"SA mark(s) use the fast-path bit {bit:#x} that {use}: {shown}. The "
                                  "marker's legacy rules take a packet carrying that bit for one the kernel "
                                  "fast path handled: it is never queued and the bit is cleared, so it "
                                  "leaves with a mark that selects no SA",
                     "give the marker a fastpath_bit that no mark on this host uses (strongSwan's %unique "
                     "counts up from 1) and restart it, or set fastpath = \"off\"")
    if not marks:
        return Check(name, INFO, f"no SA marks seen (no SAs, plugin rules or tunnels) to compare with the "
                                 f"fast-path bit {bit:#x}")
    shown = ", ".join(f"{m:#x}" for m in sorted({m for m, _w in marks}))
    return Check(name, PASS, f"no SA mark uses the fast-path bit {bit:#x} (marks {shown})")


# -- iptables-nft route chain -----------------------------------------------------------------
def check_nft_route_pitfall(f: Facts, nft: IptTable | None) -> Check:
    name = "nft-route-pitfall"
    explain = ("the nft 'route' chain (iptables-nft mangle OUTPUT) reroutes only when the chain returns "
               "ACCEPT; a queued packet returns QUEUE, so the mark the restore just set never selects a "
               "route or SA: replies break even for one client")
    fix = ("keep queue rules out of the nft-based mangle OUTPUT: remove the iptables-nft NFQUEUE rule "
           "and let l2tp-marker install its own (legacy)")
    bad: list[str] = []
    queue_only: list[str] = []
    if nft is not None:
        path = nft.reachable("OUTPUT")
        queues = [r for r in path if r.target == "NFQUEUE"]
        markers = [r for r in path if is_restore(r) or is_mark_set(r) or is_connmark_set(r)]
        if queues and markers:
            bad.append(f"iptables-nft mangle OUTPUT has '{queues[0].show()}' with '{markers[0].show()}'")
        elif queues:
            queue_only.append(f"iptables-nft mangle OUTPUT has '{queues[0].show()}'")
    if f.nft_ruleset.ok:
        chains = parse_nft_ruleset(f.nft_ruleset.text)
        for c in chains:
            if c.hook != "route output" or (nft is not None and c.table == "ip mangle"):
                continue
            stmts = list(c.statements)
            for s in list(stmts):   # follow jumps inside the table
                m = re.search(r"\b(?:jump|goto) (\S+)", s)
                if m:
                    stmts += [x for cc in chains if cc.table == c.table and cc.name == m[1]
                              for x in cc.statements]
            q = [s for s in stmts if _NFT_QUEUE_RE.search(s)]
            mk = [s for s in stmts if _NFT_MARK_RE.search(s)]
            if q and mk:
                bad.append(f"nft {c.table} chain {c.name} (type route, hook output) has '{q[0]}' with "
                           f"'{mk[0]}'")
            elif q:
                queue_only.append(f"nft {c.table} chain {c.name} has '{q[0]}'")
    if bad:
        return Check(name, FAIL, "; ".join(bad) + ": " + explain, fix)
    if nft is None and not f.nft_ruleset.ok:
        return Check(name, INFO, f"nft-based tables not readable ({f.nft_mangle.why()}): not checked")
    if queue_only:
        return Check(name, WARN, "; ".join(queue_only) + ": a mark set before it in the same route "
                                                         "chain would not reroute",
                     fix)
    return Check(name, PASS, "no queue rule in an nft route chain")


# -- rp_filter --------------------------------------------------------------------------------
def check_rp_filter(f: Facts) -> Check:
    name = "rp-filter"
    conf = f.ipv4_conf
    if not conf or "all" not in conf:
        return Check(name, WARN, "net.ipv4.conf sysctls not readable", "run doctor on Linux with /proc mounted")
    all_rp = conf["all"].get("rp_filter", 0)
    all_svm = conf["all"].get("src_valid_mark", 0)
    modes: dict[str, list[str]] = {}
    bad_ifaces, bad_default = [], False
    for ifname, vals in sorted(conf.items()):
        if ifname in ("all", "lo"):
            continue
        rp = max(all_rp, vals.get("rp_filter", 0))
        svm = bool(all_svm or vals.get("src_valid_mark", 0))
        if rp == 1 and not svm:
            if ifname == "default":
                bad_default = True
            else:
                bad_ifaces.append(ifname)
            mode = "strict without src_valid_mark"
        else:
            mode = {0: "off", 1: "strict with src_valid_mark", 2: "loose"}.get(rp, f"rp_filter={rp}")
        if ifname != "default":
            modes.setdefault(mode, []).append(ifname)
    explain = ("strict reverse-path filtering (rp_filter=1) looks the source up without the packet's mark "
               "(src_valid_mark=0), so where the way back depends on the mark (per-SA marks, fwmark rules) "
               "the reverse path lookups of marked packets fail and they are dropped")
    fix = "sysctl -w net.ipv4.conf.all.src_valid_mark=1 (or use loose mode: net.ipv4.conf.all.rp_filter=2)"
    if bad_ifaces:
        return Check(name, FAIL, f"rp_filter=1 with src_valid_mark=0 on {', '.join(bad_ifaces)}: {explain}",
                     fix)
    if bad_default:
        return Check(name, WARN, "net.ipv4.conf.default has rp_filter=1 with src_valid_mark=0: interfaces "
                                 f"created later inherit it; {explain}", fix)
    summary = "; ".join(f"rp_filter {mode} on {', '.join(ifs)}" for mode, ifs in sorted(modes.items()))
    return Check(name, PASS, summary or "no interfaces")


# -- conntrack --------------------------------------------------------------------------------
def _in_net(addr: str, net) -> bool:
    try:
        return net is not None and ipaddress.ip_address(addr) in net
    except ValueError:
        return False


def client_marks_by_address(f: Facts, legacy: IptTable | None,
                            states: list[XfrmState] | None) -> dict[str, set[int]]:
    """Which SA marks each peer address has, from every source at hand: the plugin's INPUT
    CONNMARK and PREROUTING MARK rules that saw packets, inbound SAs, the daemon's table."""
    peers: dict[str, set[int]] = {}
    entries = parse_conntrack(f.conntrack.text) if f.conntrack.ok else []
    addrs = {e.src for e in entries}
    if f.status:
        for t in f.status.get("tunnels", ()):
            addrs.add(str(t.get("peer", "")).rsplit(":", 1)[0])
    for addr in addrs:
        marks: set[int] = set()
        if legacy is not None:
            for r in list(legacy.rules("INPUT")) + list(legacy.rules("PREROUTING")):
                if not (is_connmark_set(r) or is_mark_set(r)) or r.packets == 0:
                    continue
                if _in_net(addr, _source_net(r)) and set_mark_of(r):
                    marks.add(set_mark_of(r))
        for s in states or ():
            if s.src == addr and s.mark:
                marks.add(s.mark)
        if f.status:
            for t in f.status.get("tunnels", ()):
                if str(t.get("peer", "")).rsplit(":", 1)[0] == addr and t.get("mark"):
                    marks.add(int(t["mark"]))
        peers[addr] = marks
    return peers


def check_conntrack_merge(f: Facts, legacy: IptTable | None, states: list[XfrmState] | None) -> Check:
    name = "conntrack-merge"
    if not f.conntrack.ok:
        return Check(name, INFO, f"conntrack entries not readable: {f.conntrack.why()}")
    entries = [e for e in parse_conntrack(f.conntrack.text) if L2TP_PORT in (e.dport, e.sport)]
    if not entries:
        return Check(name, INFO, "no udp/1701 conntrack entries (no L2TP traffic right now)")
    marks = client_marks_by_address(f, legacy, states)
    merged = []
    for addr in sorted({e.src for e in entries}):
        n_entries = sum(1 for e in entries if e.src == addr)
        n_clients = len(marks.get(addr, ()))
        if n_clients > n_entries:
            merged.append((addr, n_clients, n_entries, sorted(marks[addr])))
    if not merged:
        return Check(name, PASS, f"{len(entries)} udp/1701 entr(ies), none shared by several clients")
    desc = "; ".join(f"{n} clients from {addr} into {'one entry' if k == 1 else f'{k} entries'} "
                     f"(marks {', '.join(f'{m:#x}' for m in ms)})" for addr, n, k, ms in merged)
    if _daemon_answers(f):
        return Check(name, PASS, f"conntrack merges {desc}; the marker runs and returns each client's "
                                 "traffic by its tunnel")
    return Check(name, WARN, f"conntrack merges {desc}: every reply follows the client that spoke last; "
                             "only the marker can return their traffic correctly",
                 "run l2tp-marker (systemctl start l2tp-marker)")


# -- tunnel IDs -------------------------------------------------------------------------------
def check_tunnel_ids(f: Facts) -> Check:
    name = "tunnel-ids"
    twice: dict[int, int] = {}
    logs = [lf for lf in f.xl2tpd_logs if lf.text is not None]
    for lf in logs:
        for m in _TWICE_RE.finditer(lf.text):
            twice[int(m[1])] = twice.get(int(m[1]), 0) + 1
    log_desc = ", ".join(f"tunnel {t} ({n}x)" for t, n in sorted(twice.items()))
    log_names = ", ".join(lf.path for lf in logs)
    if _daemon_answers(f):
        aliased = [t for t in f.status.get("tunnels", ()) if t.get("alias") is not None]
        if twice:
            return Check(name, WARN, f"xl2tpd log {log_names} shows 'Peer requested tunnel N twice' for "
                                     f"{log_desc} although the marker runs: they predate it, or the marker "
                                     "does not see those SCCRQ",
                         "check that inbound L2TP reaches the marker's queue (--inbound-match, IPsec policy "
                         "match, rule order) and restart the clients that were refused")
        if aliased:
            peers = sorted({str(t.get("peer")) for t in aliased})
            return Check(name, PASS, f"{len(aliased)} tunnel(s) aliased (clients behind {', '.join(peers)} "
                                     "offered a tunnel ID already in use): the LNS sees unique IDs")
        return Check(name, PASS, "no tunnel ID offered twice from one address")
    if twice:
        return Check(name, FAIL, f"xl2tpd ignored second SCCRQs ('Peer requested tunnel N twice' in "
                                 f"{log_names}: {log_desc}): several clients behind one address offered "
                                 "the same tunnel ID and all but the first are refused",
                     "run l2tp-marker: it gives colliding tunnel IDs unique aliases on the way in")
    if logs:
        return Check(name, PASS, f"no 'Peer requested tunnel N twice' in {log_names}")
    unread = [f"{lf.path}: {lf.error}" for lf in f.xl2tpd_logs if lf.text is None]
    return Check(name, INFO, "cannot tell without the daemon or an xl2tpd log"
                             + (f" ({'; '.join(unread)})" if unread else " (give one with --xl2tpd-log)"))


# -- the daemon -------------------------------------------------------------------------------
def check_daemon(f: Facts) -> Check:
    name = "daemon"
    sock = f.control_socket or "the control socket"
    if f.status is not None and "error" in f.status:
        return Check(name, FAIL, f"the daemon on {sock} answered with an error: {f.status['error']}",
                     "upgrade doctor and daemon together, or restart l2tp-marker")
    if f.status is not None:
        d = f.status.get("daemon", {})
        return Check(name, PASS, f"pid {d.get('pid')}, up {d.get('uptime')} s, "
                                 f"{len(f.status.get('tunnels', ()))} tunnel(s), backend {d.get('backend')}")
    why = f.status_error or f"nothing answers on {sock}"
    if f.marker_pids:
        return Check(name, FAIL, f"l2tp-marker runs (pid {', '.join(map(str, f.marker_pids))}) but does not "
                                 f"answer on {sock}: {why}",
                     "give doctor the daemon's --socket/--config, or restart it")
    return Check(name, FAIL, f"the l2tp-marker daemon is not running {_where(f)}: {why}; L2TP packets "
                             "pass unjudged, replies follow plain connmark",
                 "start it: systemctl start l2tp-marker (or l2tp-marker run --config FILE)")


def _expected_queues(f: Facts) -> dict[str, int]:
    if f.status is not None and isinstance(f.status.get("daemon", {}).get("queues"), Mapping):
        return {k: int(v) for k, v in f.status["daemon"]["queues"].items()}
    if f.ruleset is not None:
        qs = [r for r in f.ruleset.rules if r.queue_num is not None]
        return {("in" if r.chain.endswith("-IN") else "out"): int(r.queue_num) for r in qs}
    return {}


def check_daemon_queues(f: Facts) -> Check:
    name = "daemon-queues"
    want = _expected_queues(f)
    if not want:
        return Check(name, INFO, "no queue numbers known (no configuration, no daemon)")
    if not f.nfqueue.ok:
        return Check(name, WARN, f"cannot read the kernel's queue list: {f.nfqueue.why()}",
                     "run doctor as root (modprobe nfnetlink_queue if the file is missing)")
    bound = parse_nfqueue(f.nfqueue.text)
    missing = [f"{d} {q}" for d, q in sorted(want.items()) if q not in bound]
    if missing:
        return Check(name, FAIL, f"queue(s) {', '.join(missing)} not bound: --queue-bypass lets those "
                                 "packets through unjudged (plain connmark behaviour)",
                     "start l2tp-marker (it binds both queues); if it runs, look at its log for 'cannot "
                     "bind NFQUEUE'")
    drops = [f"{d} {q}: {bound[q]['queue_dropped']} queue-full, {bound[q]['user_dropped']} undeliverable"
             for d, q in sorted(want.items()) if bound[q]["queue_dropped"] or bound[q]["user_dropped"]]
    desc = ", ".join(f"{d} {q} (portid {bound[q]['portid']})" for d, q in sorted(want.items()))
    if not _daemon_answers(f):
        return Check(name, WARN, f"queues {desc} are bound but the daemon does not answer: another program "
                                 "or another instance holds them",
                     "stop the other program, or give doctor that instance's --socket")
    if drops:
        return Check(name, WARN, f"queues {desc} bound, but the kernel dropped packets: {'; '.join(drops)}",
                     "raise queue_maxlen, and look for a slow or stuck daemon")
    return Check(name, PASS, f"queues bound: {desc}")


def check_daemon_rules(f: Facts) -> Check:
    name = "daemon-rules"
    problems = list(f.status.get("rule_problems") or ())
    repairs = int(f.status.get("rule_repairs") or 0)
    if problems:
        return Check(name, FAIL, "the daemon finds its rules damaged: " + "; ".join(problems),
                     "wait repair_interval seconds (the daemon puts them back) or restart l2tp-marker; "
                     "find what changes the mangle table")
    if repairs:
        return Check(name, WARN, f"rules intact, but the daemon had to repair them {repairs} time(s): "
                                 "something (a firewall reload?) removes them",
                     "make the firewall reload leave the L2TP-MARKER chains and jumps alone")
    return Check(name, PASS, "the daemon finds its rules intact")


def format_checks(checks: Iterable[Check]) -> list[str]:
    return [line for c in checks for line in c.lines()]


def to_json(checks: list[Check], facts: Facts) -> dict:
    return {"netns": facts.netns,
            "checks": [asdict(c) for c in checks],
            "counts": {lv: sum(1 for c in checks if c.level == lv) for lv in LEVELS},
            "exit_code": exit_code(checks)}


__all__ = ["Facts", "Output", "Xl2tpdProcess", "TextFile", "Check", "diagnose", "exit_code",
           "format_checks", "to_json", "PASS", "WARN", "FAIL", "INFO"]

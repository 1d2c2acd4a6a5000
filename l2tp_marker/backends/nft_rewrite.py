"""Aliased tunnels on the kernel fast path: the header rewrite rules, built over netlink.

An aliased tunnel's outbound data carries the alias tunnel ID the LNS knows (65535, say); the
client must receive its real ID (1). Two maps and four rules in the fast path's ``out`` chain do it
in the kernel, after the two ``out_marks`` rules (docs/fastpath-notes.md §3c, §6, §7):

* ``alias_marks`` (alias key -> SA mark) and ``alias_ids`` (alias key -> real tunnel ID), both
  keyed like ``out_marks`` by ``ip daddr . udp dport . tunnel ID as written``, and two **text**
  rules (L=1, L=0) marking from ``alias_marks``: :func:`table_map_lines` and
  :func:`table_rule_lines`, for :func:`l2tp_marker.fastpath.table_script`;
* two **rewrite** rules (L=1, L=0) that look the same key up in ``alias_ids`` and write the real
  ID back at transport header + 12 (L=1) or + 10 (L=0) with an incremental UDP checksum update
  (``NFTA_PAYLOAD_CSUM_TYPE`` INET, ``CSUM_OFFSET`` 6). nft 1.0.6 cannot express that update
  (its ``@th,96,16 set …`` has ``csum_type 0``, which breaks the checksum of every packet whose
  checksum was computed before netfilter), so these rules are sent over netlink with pyroute2:
  :func:`install_rewrite_rules`, checked by :func:`verify_rewrite_rules`.

The four alias rules match exactly what the ``out_marks`` rules match (``udp sport 1701``, T=0,
version 2) plus ``udp checksum != 0``: the kernel's incremental update would turn a zero ("no checksum") UDP
checksum into a wrong non-zero one, so such packets match neither the mark nor the rewrite and
stay on the userspace path, which rewrites them correctly. The mark rules run first because they
look up the alias, which the rewrite then replaces.

Our rewrite rules carry a rule comment (:data:`COMMENT`) so a reinstall finds and replaces them,
including copies an ``nft list``/``nft -f`` round trip recreated **without** the checksum update
(nft prints them like a raw write and keeps the comment). :func:`verify_rewrite_rules` reads them
back and reports exactly that.

The builders and checks (``table_*``, :func:`alias_element_script`, :func:`rewrite_exprs`,
:func:`to_netlink`, :func:`from_netlink`, ``check_*``) are pure; only :func:`install_rewrite_rules`, :func:`verify_rewrite_rules`
and :func:`remove_rewrite_rules` talk to the kernel, in the caller's network namespace.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

from .. import fastpath as fp
from ..constants import L2TP_PORT
from . import BackendError

ALIAS_MARKS = "alias_marks"
ALIAS_IDS = "alias_ids"
COMMENT = "l2tp-marker alias rewrite"   # + " L=1" / " L=0"; the rule userdata (nft: comment "…")

# The two L2TPv2 data header layouts: (L bit, byte offset of the tunnel ID in the UDP header).
LAYOUTS: tuple[tuple[bool, int], ...] = ((True, 12), (False, 10))

# nf_tables constants (include/uapi/linux/netfilter/nf_tables.h)
NFPROTO_IPV4 = 2
_NETWORK, _TRANSPORT = 1, 2            # NFT_PAYLOAD_NETWORK_HEADER, NFT_PAYLOAD_TRANSPORT_HEADER
_CSUM_INET = 1                         # NFT_PAYLOAD_CSUM_INET
_UDP_CSUM_OFFSET = 6                   # the UDP checksum, relative to the transport header
_META_L4PROTO = 16                     # NFT_META_L4PROTO
_EQ, _NEQ = 0, 1                       # NFT_CMP_EQ, NFT_CMP_NEQ
_REG1, _REG32_01, _REG32_02 = 1, 9, 10  # NFT_REG_1 and the 32-bit registers 1 and 2 (as nft uses them)

Expr = tuple[str, dict]                # (expression name, {attribute (without prefix): value})


# ------------------------------------------------------------------------------ text (libnftables)
def table_map_lines() -> list[str]:
    """The two map definitions, to put inside ``table ip <name> { … }`` next to ``out_marks``."""
    return ["  map alias_marks {", "    typeof ip daddr . udp dport . @th,96,16 : meta mark", "  }",
            "  map alias_ids {", "    typeof ip daddr . udp dport . @th,96,16 : @th,96,16", "  }"]


def table_rule_lines() -> list[str]:
    """The text rules for aliased tunnels' data, for chain ``out`` right after the two ``out_marks``
    rules: the mark (keyed by the alias, so before any rewrite), then the rewrite of packets without
    a UDP checksum (0: a raw write is right, and the INET update would corrupt it; xl2tpd sends its
    packets so, with SO_NO_CHECK). Packets with a checksum get the netlink-built rewrite with the
    checksum update, which :func:`install_rewrite_rules` appends after these."""
    marks = [f"    {fp._match('sport', l_bit)} meta mark set "
             f"ip daddr . udp dport . @th,{off * 8},16 map @{ALIAS_MARKS} counter"
             for l_bit, off in LAYOUTS]
    raw = [f"    {fp._match('sport', l_bit)} udp checksum 0 @th,{off * 8},16 set "
           f"ip daddr . udp dport . @th,{off * 8},16 map @{ALIAS_IDS} counter"
           for l_bit, off in LAYOUTS]
    return marks + raw


def alias_element_script(table: str, deletes: Iterable[fp.OutKey],
                         adds: Iterable[tuple[fp.OutKey, int, int]]) -> str:
    """One transaction for both alias maps: ``deletes`` are alias keys (peer address, peer port,
    alias ID); ``adds`` are ``(alias key, map value for alias_marks, real tunnel ID)``. Deletions
    come first, so a changed value is a delete plus an add (like fastpath.element_script)."""
    deletes, adds = list(deletes), list(adds)
    cmds = []
    if deletes:
        keys = ", ".join(fp._elem_out(k) for k in deletes)
        cmds += [f"delete element ip {table} {ALIAS_MARKS} {{ {keys} }}",
                 f"delete element ip {table} {ALIAS_IDS} {{ {keys} }}"]
    if adds:
        cmds += [f"add element ip {table} {ALIAS_MARKS} {{ {', '.join(fp._elem_out(k, m) for k, m, _ in adds)} }}",
                 f"add element ip {table} {ALIAS_IDS} {{ {', '.join(fp._elem_out(k, t) for k, _, t in adds)} }}"]
    return "".join(c + "\n" for c in cmds)


# ------------------------------------------------------------------------------ the rewrite rules (pure)
def comment(l_bit: bool) -> str:
    return f"{COMMENT} L={int(l_bit)}"


def rewrite_exprs(l_bit: bool, ids_map: str = ALIAS_IDS) -> list[Expr]:
    """The rewrite rule's expressions, in the register layout nft itself uses for the text form
    (``nft --debug=netlink``), so ``nft list`` prints it readably:

    ``udp sport 1701 @th,64,8 & 0xc0 == 0x40|0x0 @th,72,8 & 0xf == 0x2 udp checksum != 0
    @th,96|80,16 set ip daddr . udp dport . @th,96|80,16 map @alias_ids counter``

    — except for the payload write's checksum attributes, which nft cannot print or parse."""
    toff = next(off for lb, off in LAYOUTS if lb == l_bit)
    return [
        ("meta", {"dreg": _REG1, "key": _META_L4PROTO}),                              # meta l4proto
        ("cmp", {"sreg": _REG1, "op": _EQ, "data": b"\x11"}),                         # == udp
        ("payload", {"dreg": _REG1, "base": _TRANSPORT, "offset": 0, "len": 2}),      # udp sport
        ("cmp", {"sreg": _REG1, "op": _EQ, "data": L2TP_PORT.to_bytes(2, "big")}),    # == 1701
        ("payload", {"dreg": _REG1, "base": _TRANSPORT, "offset": 8, "len": 1}),      # T, L bits
        ("bitwise", {"sreg": _REG1, "dreg": _REG1, "len": 1, "mask": b"\xc0", "xor": b"\x00"}),
        ("cmp", {"sreg": _REG1, "op": _EQ, "data": b"\x40" if l_bit else b"\x00"}),   # T=0, L
        ("payload", {"dreg": _REG1, "base": _TRANSPORT, "offset": 9, "len": 1}),      # version
        ("bitwise", {"sreg": _REG1, "dreg": _REG1, "len": 1, "mask": b"\x0f", "xor": b"\x00"}),
        ("cmp", {"sreg": _REG1, "op": _EQ, "data": b"\x02"}),                         # == 2
        ("payload", {"dreg": _REG1, "base": _TRANSPORT, "offset": _UDP_CSUM_OFFSET, "len": 2}),
        ("cmp", {"sreg": _REG1, "op": _NEQ, "data": b"\x00\x00"}),                    # udp checksum != 0
        ("payload", {"dreg": _REG1, "base": _NETWORK, "offset": 16, "len": 4}),       # ip daddr
        ("payload", {"dreg": _REG32_01, "base": _TRANSPORT, "offset": 2, "len": 2}),  # . udp dport
        ("payload", {"dreg": _REG32_02, "base": _TRANSPORT, "offset": toff, "len": 2}),  # . alias ID
        ("lookup", {"set": ids_map, "sreg": _REG1, "dreg": _REG1}),                   # -> real ID
        ("payload", {"sreg": _REG1, "base": _TRANSPORT, "offset": toff, "len": 2,     # write it back,
                     "csum_type": _CSUM_INET, "csum_offset": _UDP_CSUM_OFFSET}),      # checksum updated
        ("counter", {}),
    ]


def to_netlink(exprs: Sequence[Expr]) -> list[dict]:
    """pyroute2's attribute form of ``exprs`` (for NFTA_RULE_EXPRESSIONS)."""
    res = []
    for name, attrs in exprs:
        data = []
        for key, value in attrs.items():
            if isinstance(value, bytes):
                value = {"attrs": [("NFTA_DATA_VALUE", value)]}
            data.append((f"NFTA_{name.upper()}_{key.upper()}", value))
        res.append({"attrs": [("NFTA_EXPR_NAME", name), ("NFTA_EXPR_DATA", {"attrs": data})]})
    return res


def _names() -> dict[str, int]:
    """pyroute2 decodes enumerated attributes to names: the way back to the numbers."""
    from pyroute2.netlink.nfnetlink.nftsocket import Cmp, Meta, Regs  # noqa: PLC0415

    names = {x.name: int(x.value) for enum in (Regs, Cmp, Meta) for x in enum}
    names.update({"NFT_PAYLOAD_LL_HEADER": 0, "NFT_PAYLOAD_NETWORK_HEADER": 1,
                  "NFT_PAYLOAD_TRANSPORT_HEADER": 2, "NFT_PAYLOAD_INNER_HEADER": 3,
                  "NFT_PAYLOAD_CSUM_NONE": 0, "NFT_PAYLOAD_CSUM_INET": 1, "NFT_PAYLOAD_CSUM_SCTP": 2,
                  "NFT_BITWISE_BOOL": 0, "NFT_BITWISE_LSHIFT": 1, "NFT_BITWISE_RSHIFT": 2})
    return names


def from_netlink(exprs: Iterable) -> list[Expr]:
    """A dumped rule's NFTA_RULE_EXPRESSIONS (pyroute2 messages) in the form of :func:`rewrite_exprs`.
    Counter values are dropped; attributes the kernel omits (a zero ``csum_type``) stay absent."""
    names = _names()
    res: list[Expr] = []
    for e in exprs:
        name = e.get_attr("NFTA_EXPR_NAME")
        data = e.get_attr("NFTA_EXPR_DATA")
        attrs: dict = {}
        prefix = f"NFTA_{str(name).upper()}_"
        for key, value in (data["attrs"] if data is not None else ()):
            if name == "counter" or not key.startswith(prefix) or key.endswith("_PAD"):
                continue
            if hasattr(value, "get_attr"):
                value = value.get_attr("NFTA_DATA_VALUE")
            if isinstance(value, str) and value in names and key != "NFTA_LOOKUP_SET":
                value = names[value]
            elif isinstance(value, frozenset):  # decoded flag bits
                value = tuple(sorted(value)) or 0
            attrs[key[len(prefix):].lower()] = value
        res.append((name, attrs))
    return res


def check_rule(got: Sequence[Expr], l_bit: bool, ids_map: str = ALIAS_IDS) -> list[str]:
    """What is wrong with one rewrite rule read back (``got``, as :func:`from_netlink` gives it)
    compared with :func:`rewrite_exprs` (empty: nothing). The payload write gets its own messages
    (checksum type and offset, offset, length); any other difference is named by position."""
    want = rewrite_exprs(l_bit, ids_map)
    what = f"rewrite rule L={int(l_bit)}"
    w_write = next(a for n, a in want if n == "payload" and "sreg" in a)
    writes = [a for n, a in got if n == "payload" and "sreg" in a]
    problems = []
    if len(writes) != 1:
        problems.append(f"{what}: {len(writes)} payload writes instead of 1")
    for a in writes[:1]:
        if a.get("csum_type", 0) != _CSUM_INET:
            problems.append(f"{what}: checksum type {a.get('csum_type', 0)} instead of INET ({_CSUM_INET}): "
                            "the UDP checksum would not be updated (an nft text round trip does this)")
        if a.get("csum_offset", 0) != _UDP_CSUM_OFFSET:
            problems.append(f"{what}: checksum offset {a.get('csum_offset', 0)} instead of {_UDP_CSUM_OFFSET}")
        if a.get("offset") != w_write["offset"] or a.get("base") != _TRANSPORT:
            problems.append(f"{what}: writes at {_base(a.get('base'))} + {a.get('offset')} instead of "
                            f"transport header + {w_write['offset']}")
        if a.get("len") != w_write["len"]:
            problems.append(f"{what}: writes {a.get('len')} bytes instead of {w_write['len']}")
        if a.get("csum_flags", 0):
            problems.append(f"{what}: unexpected checksum flags {a.get('csum_flags')}")
    if problems:
        return problems
    if len(got) != len(want):
        return [f"{what}: {len(got)} expressions instead of {len(want)}"]
    for i, ((gn, ga), (wn, wa)) in enumerate(zip(got, want)):
        if gn != wn or _canon(ga) != _canon(wa):
            return [f"{what}: expression {i + 1} is {gn} {ga}, expected {wn} {wa}"]
    return []


_DEFAULT_ZERO = frozenset({"csum_type", "csum_offset", "csum_flags", "flags", "op"})


def _canon(attrs: dict) -> dict:
    """Attributes whose absence means 0 (the kernel may or may not dump them) compare as absent."""
    return {k: v for k, v in attrs.items() if not (k in _DEFAULT_ZERO and v == 0)}


def _base(b) -> str:
    return {0: "link header", 1: "network header", 2: "transport header"}.get(b, f"base {b}")


def check_chain(rules: Sequence[tuple[int, str | None, list[Expr]]], ids_map: str = ALIAS_IDS,
                marks_map: str = ALIAS_MARKS) -> list[str]:
    """Problems with our rewrite rules in one chain. ``rules``: the chain's rules in order, each as
    ``(handle, comment or None, expressions)``. Each layout needs exactly one rule with our comment,
    correct (:func:`check_rule`), and after every rule that looks up ``marks_map``."""
    problems = []
    last_mark = max((i for i, (_, _, ex) in enumerate(rules)
                     if any(n == "lookup" and a.get("set") == marks_map for n, a in ex)), default=-1)
    if last_mark < 0:
        problems.append(f"no rule marks from map {marks_map} (the table_script additions are missing)")
    for l_bit, _ in LAYOUTS:
        mine = [(i, ex) for i, (_, c, ex) in enumerate(rules) if c == comment(l_bit)]
        if not mine:
            problems.append(f"rewrite rule L={int(l_bit)} is missing")
            continue
        if len(mine) > 1:
            problems.append(f"rewrite rule L={int(l_bit)} is there {len(mine)} times")
        for i, ex in mine:
            problems += check_rule(ex, l_bit, ids_map)
            if i < last_mark:
                problems.append(f"rewrite rule L={int(l_bit)} runs before a rule marking from {marks_map} "
                                "(the mark lookup is keyed by the alias, so it must come first)")
    return problems


# ------------------------------------------------------------------------------ netlink I/O
def _nft():
    try:
        from pyroute2.nftables.main import NFTables  # noqa: PLC0415 - only on the live path
    except ImportError as exc:
        raise BackendError(f"pyroute2 is not available ({exc})") from None
    try:
        return NFTables(nfgen_family=NFPROTO_IPV4)
    except Exception as exc:  # noqa: BLE001 - socket errors come in several classes
        raise BackendError(f"cannot open an nftables netlink socket: {exc}") from None


def _rule_comment(rule) -> str | None:
    ud = rule.get_attr("NFTA_RULE_USERDATA")
    if isinstance(ud, bytes):  # a userdata pyroute2 could not decode as a comment
        return None
    return ud


def _dump(nl, table: str, chain: str) -> list[tuple[int, str | None, list[Expr]]] | None:
    """The chain's rules in order (None: no such chain)."""
    if not any(c.get_attr("NFTA_CHAIN_TABLE") == table and c.get_attr("NFTA_CHAIN_NAME") == chain
               for c in nl.get_chains()):
        return None
    return [(r.get_attr("NFTA_RULE_HANDLE"), _rule_comment(r), from_netlink(r.get_attr("NFTA_RULE_EXPRESSIONS") or []))
            for r in nl.get_rules()
            if r.get_attr("NFTA_RULE_TABLE") == table and r.get_attr("NFTA_RULE_CHAIN") == chain]


# The maps as the kernel holds them: key length (4 + 4 + 4: each concatenated field takes a whole
# 32-bit register) and data length (the mark: 4, the tunnel ID: 2).
MAP_SHAPES = {ALIAS_MARKS: (12, 4), ALIAS_IDS: (12, 2)}


def check_maps(found: dict[str, tuple[bool, int | None, int | None]], table: str) -> list[str]:
    """Problems with the alias maps. ``found``: set name -> (is a map, key length, data length)."""
    problems = []
    for name, (klen, dlen) in MAP_SHAPES.items():
        got = found.get(name)
        if got is None:
            problems.append(f"nftables map {name} is missing from table ip {table}")
        elif not got[0]:
            problems.append(f"nftables {name} in table ip {table} is a set, not a map")
        elif got[1:] != (klen, dlen):
            problems.append(f"nftables map {name} in table ip {table} has key/data length {got[1]}/{got[2]} "
                            f"instead of {klen}/{dlen} (see nft_rewrite.table_map_lines)")
    return problems


def _maps(nl, table: str) -> dict[str, tuple[bool, int | None, int | None]]:
    res = {}
    for s in nl.get_sets():
        if s.get_attr("NFTA_SET_TABLE") == table and s.get_attr("NFTA_SET_NAME") in MAP_SHAPES:
            flags = s.get_attr("NFTA_SET_FLAGS") or ()
            res[s.get_attr("NFTA_SET_NAME")] = ("NFT_SET_MAP" in flags, s.get_attr("NFTA_SET_KEY_LEN"),
                                                s.get_attr("NFTA_SET_DATA_LEN"))
    return res


def _batch(nl, msgs: list) -> None:
    """Send ``msgs`` (nft_rule_msg) as one nf_tables transaction: all or nothing."""
    from pyroute2.netlink import NLM_F_ACK, NLM_F_REQUEST  # noqa: PLC0415
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES, nfgen_msg  # noqa: PLC0415

    def edge(kind: int):
        m = nfgen_msg()
        m["res_id"] = NFNL_SUBSYS_NFTABLES
        m["header"]["type"] = kind   # NFNL_MSG_BATCH_BEGIN / _END
        m["header"]["flags"] = NLM_F_REQUEST
        return m

    for m in msgs:
        m["header"]["flags"] |= NLM_F_REQUEST | NLM_F_ACK
        m["nfgen_family"] = NFPROTO_IPV4
    nl.nlm_request_batch([edge(0x10), *msgs, edge(0x11)])


def _rule_msg(kind: str, table: str, chain: str, *, handle: int | None = None,
              exprs: Sequence[Expr] | None = None, note: str | None = None):
    from pyroute2.netlink import NLM_F_APPEND, NLM_F_CREATE  # noqa: PLC0415
    from pyroute2.netlink.nfnetlink import NFNL_SUBSYS_NFTABLES  # noqa: PLC0415
    from pyroute2.netlink.nfnetlink.nftsocket import NFT_MSG_DELRULE, NFT_MSG_NEWRULE, nft_rule_msg  # noqa: PLC0415

    m = nft_rule_msg()
    m["attrs"] = [["NFTA_RULE_TABLE", table], ["NFTA_RULE_CHAIN", chain]]
    if kind == "del":
        m["attrs"].append(["NFTA_RULE_HANDLE", handle])
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_DELRULE
        m["header"]["flags"] = 0
    else:
        m["attrs"].append(["NFTA_RULE_EXPRESSIONS", to_netlink(exprs or [])])
        if note:
            m["attrs"].append(["NFTA_RULE_USERDATA", note])
        m["header"]["type"] = (NFNL_SUBSYS_NFTABLES << 8) | NFT_MSG_NEWRULE
        m["header"]["flags"] = NLM_F_CREATE | NLM_F_APPEND
    return m


def _ours(rules) -> list[int]:
    notes = {comment(lb) for lb, _ in LAYOUTS}
    return [h for h, c, _ in rules if c in notes]


def install_rewrite_rules(table: str, chain: str = "out") -> None:
    """Append the two rewrite rules to ``ip <table> <chain>`` in one transaction, replacing any
    earlier rewrite rules of ours (found by their comment, so also round-tripped copies), then read
    them back (:func:`check_chain`).

    Needs the table as :func:`table_map_lines` and :func:`table_rule_lines` extend it: the chain,
    both alias maps and the alias mark rules. Raises BackendError: if a precondition fails or the
    kernel refuses the transaction, nothing changed; if the rules read back wrong, they are removed
    again (then take the aliased tunnels off the maps: they would be marked, not rewritten)."""
    what = f"the alias rewrite rules in ip {table} {chain}"
    nl = _nft()
    try:
        try:
            rules = _dump(nl, table, chain)
            if rules is None:
                raise BackendError(f"cannot install {what}: nftables chain ip {table} {chain} is missing")
            bad = check_maps(_maps(nl, table), table)
            if not any(n == "lookup" and a.get("set") == ALIAS_MARKS for _, _, ex in rules for n, a in ex):
                bad.append(f"no rule in the chain marks from map {ALIAS_MARKS} (nft_rewrite.table_rule_lines)")
            if bad:
                raise BackendError(f"cannot install {what}: " + "; ".join(bad))
            msgs = [_rule_msg("del", table, chain, handle=h) for h in _ours(rules)]
            msgs += [_rule_msg("add", table, chain, exprs=rewrite_exprs(lb), note=comment(lb)) for lb, _ in LAYOUTS]
            _batch(nl, msgs)
            rules = _dump(nl, table, chain) or []
            bad = check_chain(rules)
            if bad:
                handles = _ours(rules)
                if handles:
                    _batch(nl, [_rule_msg("del", table, chain, handle=h) for h in handles])
                raise BackendError(f"{what} did not read back as installed (removed them again): " + "; ".join(bad))
        except BackendError:
            raise
        except Exception as exc:  # noqa: BLE001 - NetlinkError and socket errors
            raise BackendError(f"cannot install {what}: {_why(exc)}") from None
    finally:
        nl.close()


def remove_rewrite_rules(table: str, chain: str = "out") -> int:
    """Delete our rewrite rules (safe when they or the chain are not there); returns how many.
    Remove the alias maps' elements first, or aliased data would be marked but not rewritten."""
    nl = _nft()
    try:
        try:
            rules = _dump(nl, table, chain)
            handles = _ours(rules or [])
            if handles:
                _batch(nl, [_rule_msg("del", table, chain, handle=h) for h in handles])
            return len(handles)
        except Exception as exc:  # noqa: BLE001
            raise BackendError(f"cannot remove the alias rewrite rules from ip {table} {chain}: {_why(exc)}") from None
    finally:
        nl.close()


def verify_rewrite_rules(table: str, chain: str = "out") -> list[str]:
    """What is wrong with the rewrite rules in ``ip <table> <chain>``, read back over netlink
    (empty: nothing): missing or doubled rules, a payload write without the INET checksum update
    at offset 6 (e.g. after ``nft list``/``nft -f``), a wrong offset or length, a rule order that
    rewrites before the alias mark lookup, a missing map."""
    try:
        nl = _nft()
    except BackendError as exc:
        return [str(exc)]
    try:
        rules = _dump(nl, table, chain)
        if rules is None:
            return [f"nftables chain ip {table} {chain} is missing"]
        return check_maps(_maps(nl, table), table) + check_chain(rules)
    except Exception as exc:  # noqa: BLE001
        return [f"cannot read nftables chain ip {table} {chain}: {_why(exc)}"]
    finally:
        nl.close()


def _why(exc: Exception) -> str:
    code = getattr(exc, "code", None)
    if code is not None:
        import os  # noqa: PLC0415

        return f"{os.strerror(code)} (errno {code})"
    return str(exc) or type(exc).__name__

"""The kernel fast path's adapter: libnftables (``libnftables.so.1``, from the nftables package)
through ctypes, in the daemon's own network namespace.

Only this module changes the fast path's nftables table. It keeps what it installed, so every
synchronisation sends only the difference, in one transaction; a failed transaction is retried
element by element so one bad element cannot keep the others out. What to install comes from
:mod:`l2tp_marker.fastpath` (pure).
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from typing import NamedTuple

from .. import fastpath as fp
from . import BackendError
from . import nft_rewrite as rw

log = logging.getLogger(__name__)

_OUTPUT_JSON = 1 << 4
_OUTPUT_TERSE = 1 << 11


class Nft:
    """A libnftables context: ``run(text) -> (rc, output, error)``."""

    def __init__(self, soname: str = "libnftables.so.1"):
        try:
            lib = ctypes.CDLL(soname)
        except OSError as exc:
            raise BackendError(f"libnftables is not available ({exc}); install the nftables package") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        for name in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
        for name in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, name).argtypes = [ctypes.c_void_p]
            getattr(lib, name).restype = ctypes.c_char_p
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        lib.nft_run_cmd_from_buffer.restype = ctypes.c_int
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        if not self._ctx:
            raise BackendError("libnftables: cannot create a context")
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)

    def run(self, text: str, *, json_out: bool = False) -> tuple[int, str, str]:
        lib, ctx = self._lib, self._ctx
        flags = lib.nft_ctx_output_get_flags(ctx)
        want = (flags | _OUTPUT_JSON | _OUTPUT_TERSE) if json_out else (flags & ~(_OUTPUT_JSON | _OUTPUT_TERSE))
        lib.nft_ctx_output_set_flags(ctx, want)
        rc = lib.nft_run_cmd_from_buffer(ctx, text.encode())
        out = (lib.nft_ctx_get_output_buffer(ctx) or b"").decode(errors="replace")
        err = (lib.nft_ctx_get_error_buffer(ctx) or b"").decode(errors="replace")
        return rc, out, err

    def close(self) -> None:
        if self._ctx:
            self._lib.nft_ctx_free(self._ctx)
            self._ctx = None


def _looks_up(exprs, set_name: str | None = None) -> bool:
    """Does a rule (its expressions, as pyroute2 gives them) look up ``set_name`` (any set: None)?"""
    for e in exprs:
        if e.get_attr("NFTA_EXPR_NAME") == "lookup":
            data = e.get_attr("NFTA_EXPR_DATA")
            if data is not None and (set_name is None or data.get_attr("NFTA_LOOKUP_SET") == set_name):
                return True
    return False


class _Op(NamedTuple):
    store: set   # the installed keys it changes (KernelFastPath.out, .inb or .alias)
    key: int
    add: bool
    script: str  # the nft command


class KernelFastPath:
    """Installs, fills, checks and removes the fast path's table (``ip <table>``)."""

    def __init__(self, table: str, bit: int = fp.DEFAULT_BIT, nft: Nft | None = None, aliases: bool = True):
        self.table = table
        self.bit = bit
        self._nft = nft
        # Which keys the kernel holds (as far as we know), by the engine's integer keys. Only the
        # keys: a changed key is deleted and added again, so no copy of the values is kept.
        self.out: set[int] = set()     # out_marks
        self.inb: set[int] = set()     # in_known (fastpath.in_key)
        self.alias: set[int] = set()   # alias_marks and alias_ids
        # Aliased tunnels are on the kernel path only while the rewrite rules are in place and
        # verified (checksum update included); otherwise their data stays on the userspace path.
        self.want_aliases = aliases
        self.aliases_in_kernel = False
        self.alias_reason = "not installed"
        self.stats = {"commits": 0, "elements_added": 0, "elements_deleted": 0, "errors": 0,
                      "reinstalls": 0, "last_commit_ms": 0.0}
        self.installed = False

    # ------------------------------------------------------------------ lifecycle
    @property
    def nft(self) -> Nft:
        if self._nft is None:
            self._nft = Nft()
        return self._nft

    def is_supported(self) -> tuple[bool, str]:
        """Can this kernel run the fast path? Tries the real table under a scratch name."""
        if os.geteuid() != 0:
            return False, "needs root (CAP_NET_ADMIN)"
        try:
            nft = self.nft
        except BackendError as exc:
            return False, str(exc)
        probe = f"{self.table}_probe"[:60]
        rc, _, err = nft.run(fp.table_script(probe, self.bit, rw.table_map_lines(), rw.table_rule_lines()))
        nft.run(fp.delete_script(probe))
        if rc != 0:
            return False, "nftables cannot build the fast-path table: " + " ".join(err.split())[:300]
        return True, "nftables route chain with a tunnel map"

    def _script(self) -> str:
        return fp.table_script(self.table, self.bit, rw.table_map_lines(), rw.table_rule_lines())

    def install(self, engine) -> None:
        """(Re)create the table with an entry for every tunnel of ``engine``, in one transaction;
        then the aliased tunnels' rewrite rules (netlink) and, once they verify, their entries."""
        out_add, in_add, aliased = [], [], []
        for k, t in engine.out_index.items():
            if isinstance(k, int):
                if (v := fp.kernel_out_value(t, self.bit)) is not None:
                    out_add.append((k, v))
                elif fp.kernel_alias_value(t, self.bit) is not None:
                    aliased.append(k)
        for k3, x in engine.in_index.items():
            if isinstance(k3, int):
                for ik in {fp.in_key(k3, t.mark) for t in fp.members(x)}:
                    if fp.kernel_in_ok(engine, ik, self.bit):
                        in_add.append(ik)
        script = self._script() + self._elements([], out_add, [], in_add)
        t0 = time.perf_counter()
        rc, _, err = self.nft.run(script)
        if rc != 0:
            raise BackendError(f"cannot install nftables table ip {self.table}: {' '.join(err.split())[:400]}")
        self.stats["last_commit_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        self.out = {k for k, _ in out_add}
        self.inb = set(in_add)
        self.alias = set()
        self.installed = True
        self.stats["elements_added"] += len(out_add) + len(in_add)
        self.aliases_in_kernel = False
        if not self.want_aliases:
            self.alias_reason = "off"
            return
        try:
            rw.install_rewrite_rules(self.table)
        except BackendError as exc:
            self.alias_reason = f"rewrite rules not installed: {exc}"
            log.warning("aliased tunnels stay on the per-packet path: %s", self.alias_reason)
            return
        self.aliases_in_kernel, self.alias_reason = True, "rewrite rules verified"
        self._apply([self._op(self.alias, k, fp.kernel_alias_value(engine.out_index[k], self.bit))
                     for k in aliased])

    def _elements(self, out_del, out_add, in_del, in_add) -> str:
        return fp.element_script(self.table, [fp.out_key_text(k) for k in out_del],
                                 [(fp.out_key_text(k), v) for k, v in out_add],
                                 [fp.in_key_text(k) for k in in_del], [fp.in_key_text(k) for k in in_add])

    def _op(self, store: set[int], key: int, value=None) -> _Op:
        """Deleting (``value`` None) or adding one element of ``store``'s map or set, as nft text."""
        add = value is not None
        if store is self.alias:
            script = rw.alias_element_script(self.table, [] if add else [fp.out_key_text(key)],
                                             [(fp.out_key_text(key), *value)] if add else [])
        elif store is self.out:
            script = self._elements([] if add else [key], [(key, value)] if add else [], [], [])
        else:
            script = self._elements([], [], [] if add else [key], [key] if add else [])  # a set: no value
        return _Op(store, key, add, script)

    def _apply(self, ops: list[_Op]) -> None:
        """One transaction for ``ops`` (deletions first, so a changed value is a delete and an add).
        If the kernel refuses it, each op alone, so one bad element cannot keep the others out; a
        delete of an element that is already gone (someone flushed the map) is not an error."""
        if not ops:
            return
        ops = sorted(ops, key=lambda op: op.add)
        t0 = time.perf_counter()
        rc, _, err = self.nft.run("".join(op.script for op in ops))
        self.stats["last_commit_ms"] = round((time.perf_counter() - t0) * 1000, 3)
        self.stats["commits"] += 1
        if rc == 0:
            results = [(op, 0, "") for op in ops]
        else:
            log.warning("fast-path update failed (%s); retrying element by element", " ".join(err.split())[:200])
            results = [(op, *self.nft.run(op.script)[::2]) for op in ops]
        for op, rc, err in results:
            if not op.add:
                op.store.discard(op.key)
                self.stats["elements_deleted"] += rc == 0
            elif rc == 0:
                op.store.add(op.key)
                self.stats["elements_added"] += 1
            else:
                self.stats["errors"] += 1
                log.error("fast path: cannot add %s: %s (its data stays on the userspace path)",
                          op.script.strip(), " ".join(err.split())[:200])

    def remove(self) -> None:
        """Delete the table (safe when it is not there)."""
        if self._nft is None and not self.installed:
            return
        rc, _, err = self.nft.run(fp.delete_script(self.table))
        self.installed = self.aliases_in_kernel = False
        self.out.clear()
        self.inb.clear()
        self.alias.clear()
        if rc != 0:
            raise BackendError(f"cannot delete nftables table ip {self.table}: {' '.join(err.split())[:300]}")

    def close(self) -> None:
        if self._nft is not None:
            self._nft.close()
            self._nft = None

    # ------------------------------------------------------------------ elements
    def sync(self, engine, changes: fp.FastChanges) -> int:
        """Bring the kernel in line with ``engine`` for the keys in ``changes``; returns the
        elements changed (one transaction, or element by element if that one failed)."""
        dirty_out, dirty_in = changes.take()
        if not self.installed:
            return 0
        ops = []
        for k in dirty_out:  # a key that changed: delete what is there, add what should be
            t = engine.out_index.get(k)
            for store, want in ((self.out, fp.kernel_out_value(t, self.bit)),
                                (self.alias, fp.kernel_alias_value(t, self.bit) if self.aliases_in_kernel else None)):
                if k in store:
                    ops.append(self._op(store, k))
                if want is not None:
                    ops.append(self._op(store, k, want))
        for k in dirty_in:
            want, have = fp.kernel_in_ok(engine, k, self.bit), k in self.inb
            if want != have:
                ops.append(self._op(self.inb, k, True if want else None))
        self._apply(ops)
        return len(ops)

    # ------------------------------------------------------------------ checks and counters
    # Read over netlink with pyroute2: libnftables would load every map element into its cache
    # first (about a second with 100,000 tunnels), pyroute2 reads the rules alone (~2 ms).
    def _read(self, exprs: bool = True) -> dict | None:
        """Chains, sets, and the rules of each chain; with ``exprs`` also every rule's expressions
        (pyroute2 decodes nested attributes in Python: ~13 ms for this table, so the quick check
        counts the rules without them). Rules that look up ``alias_ids`` are the aliased tunnels'
        rewrites, kept apart."""
        from pyroute2.nftables.main import NFTables  # noqa: PLC0415 - only on the live path

        nl = NFTables(nfgen_family=2)  # NFPROTO_IPV4
        try:
            chains = {c.get_attr("NFTA_CHAIN_NAME"): c.get_attr("NFTA_CHAIN_HOOK")
                      for c in nl.get_chains() if c.get_attr("NFTA_CHAIN_TABLE") == self.table}
            if not chains:
                return None
            sets = {x.get_attr("NFTA_SET_NAME") for x in nl.get_sets() if x.get_attr("NFTA_SET_TABLE") == self.table}
            counts: dict[str, int] = {}
            rules: dict[str, list[list]] = {}
            rewrites: list[list] = []
            for r in nl.get_rules():
                if r.get_attr("NFTA_RULE_TABLE") == self.table:
                    chain = r.get_attr("NFTA_RULE_CHAIN")
                    counts[chain] = counts.get(chain, 0) + 1
                    if exprs:
                        ex = r.get_attr("NFTA_RULE_EXPRESSIONS") or []
                        (rewrites if _looks_up(ex, rw.ALIAS_IDS) else rules.setdefault(chain, [])).append(ex)
        finally:
            nl.close()
        return {"chains": chains, "sets": sets, "counts": counts, "rules": rules, "rewrites": rewrites}

    def check(self, full: bool = True) -> list[str]:
        """What is wrong with the installed table (empty: nothing). Always: chains, hooks, sets,
        rule counts (~3 ms). ``full`` also reads every rule's expressions and the rewrite rules'
        checksum update (~35 ms), which the daemon does less often, so the packet loop never
        stalls that long every repair_interval."""
        if not self.installed:
            return []
        try:
            got = self._read(exprs=full)
        except Exception as exc:  # netlink errors come in several classes
            return [f"cannot read nftables table ip {self.table}: {exc}"]
        if got is None:
            return [f"nftables table ip {self.table} is missing"]
        problems = [f"nftables set {n} is missing" for n in ("out_marks", "in_known", rw.ALIAS_MARKS, rw.ALIAS_IDS)
                    if n not in got["sets"]]
        # out: out_marks and alias_marks (L=1, L=0 each), the plain rewrites and (when aliased
        # tunnels are in the kernel) the netlink-built ones
        want = {"out": 6 + (2 if self.aliases_in_kernel else 0), "in": 2}
        for name, hooknum in (("out", 3), ("in", 1)):  # NF_INET_LOCAL_OUT, NF_INET_LOCAL_IN
            hook = got["chains"].get(name)
            if hook is None:
                problems.append(f"nftables chain {self.table} {name} is missing")
                continue
            if (hook.get_attr("NFTA_HOOK_HOOKNUM"), hook.get_attr("NFTA_HOOK_PRIORITY")) != (hooknum, fp.PRIORITY):
                problems.append(f"nftables chain {self.table} {name} is not on its hook at priority {fp.PRIORITY}")
            if got["counts"].get(name, 0) != want[name]:
                problems.append(f"nftables chain {self.table} {name} holds {got['counts'].get(name, 0)} rules, "
                                f"not {want[name]}")
            elif full and not all(_looks_up(ex) for ex in got["rules"].get(name, [])):
                problems.append(f"nftables chain {self.table} {name} holds a rule that is not ours")
        if full and self.aliases_in_kernel:
            problems += rw.verify_rewrite_rules(self.table)
        return problems

    def counters(self) -> dict[str, int]:
        """Packets the kernel fast path handled, per direction (from the rules' counters)."""
        res = {"packets_out": 0, "packets_in": 0, "bytes_out": 0, "bytes_in": 0, "packets_rewritten": 0}
        if not self.installed:
            return res
        try:
            got = self._read()
        except Exception:
            return res
        for name in ("out", "in"):
            for exprs in (got or {}).get("rules", {}).get(name, []):
                for e in exprs:
                    if e.get_attr("NFTA_EXPR_NAME") == "counter":
                        data = e.get_attr("NFTA_EXPR_DATA")
                        res[f"packets_{name}"] += int(data.get_attr("NFTA_COUNTER_PACKETS") or 0)
                        res[f"bytes_{name}"] += int(data.get_attr("NFTA_COUNTER_BYTES") or 0)
        for exprs in (got or {}).get("rewrites", []):
            for e in exprs:
                if e.get_attr("NFTA_EXPR_NAME") == "counter":
                    res["packets_rewritten"] += int(e.get_attr("NFTA_EXPR_DATA").get_attr("NFTA_COUNTER_PACKETS") or 0)
        return res

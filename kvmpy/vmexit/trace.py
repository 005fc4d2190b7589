"""Exit traces: one JSON object per line, one line per exit (``kvmpy run --trace FILE``).

Fields: ``t`` (seconds since the tracer was made, just before the VM is built), ``vcpu``,
``reason`` (KVM_EXIT_* name without the prefix), ``rip``; for IO ``port``, ``size``, ``dir``
("in"/"out"), ``count``, ``data`` (a list when count > 1); for MMIO ``addr``, ``size``, ``dir``,
``data``; for accesses to a device ``device`` and, when the device names it, ``register``.
Unclaimed accesses have ``device: "unassigned"``. Other exits carry their decoded fields
(``suberror``, ``insn_bytes``, ``hardware_reason``, ``type``, ``pc``...). Numbers are plain JSON
integers. ``rip`` is where the vCPU stands at the exit: the exiting instruction, or the one after
it when KVM completed it first (HLT always; OUT on some KVMs).

For people, every line also has ``what``, one line saying what happened (``COM1.LSR read ->
0x60``, ``COM1.THR write 0x41 'A'``, ``unassigned port 0x3f4 read -> 0xff``, ``MMIO 0xd0000000
(unassigned) write 4 bytes 0x12345678``, ``HLT``), and, when the tracer has symbols
(kvmpy/symbols.py), ``sym``: the RIP as ``name+0xoff`` (absent when no symbol covers it). The
other fields are unchanged, so readers of older traces keep working; :func:`describe` computes
``what`` for a line that lacks it. kvmpy/tracetools.py summarizes and plots traces.

Tracing reads the registers on every exit (KVM_GET_REGS), so it is slow by design; without
``--trace`` nothing here runs (the dispatcher calls the tracer only when there is one).
"""
from __future__ import annotations

import json
import os
import threading
import time

from kvmpy.vmexit.exits import InternalSuberror

# KVM_SYSTEM_EVENT_* (include/uapi/linux/kvm.h)
SYSTEM_EVENTS = {1: "SHUTDOWN", 2: "RESET", 3: "CRASH", 4: "WAKEUP", 5: "SUSPEND",
                 6: "SEV_TERM", 7: "TDX_FATAL"}
_VALUES_SHOWN = 8   # of a string I/O access


class Tracer:
    """Writes one JSON line per exit to ``out`` (a text file); thread-safe.

    ``symbols`` names RIPs in the ``sym`` field: a :class:`kvmpy.symbols.SymbolTable`, or the
    path of a System.map or ELF file to load one from (a bad file raises SymbolsError now, not
    at the first exit).
    """

    def __init__(self, out, symbols=None):
        if isinstance(symbols, (str, os.PathLike)):
            from kvmpy.symbols import load

            symbols = load(symbols)
        self._out = out
        self.symbols = symbols
        self._lock = threading.Lock()
        self._t0 = time.monotonic()
        self.records = 0

    def record(self, vcpu, entry: dict) -> None:
        entry["t"] = round(time.monotonic() - self._t0, 6)
        entry["vcpu"] = vcpu.id
        try:
            rip = vcpu.get_regs().rip
        except Exception:  # the vCPU may be gone (trace of a late exit): keep the line
            rip = None
        entry["rip"] = rip
        if self.symbols is not None:
            sym = self.symbols.lookup(rip)
            if sym is not None:
                entry["sym"] = sym
        entry["what"] = describe(entry)
        line = json.dumps(entry, separators=(",", ":"))
        with self._lock:
            self._out.write(line + "\n")
            self.records += 1

    def close(self) -> None:
        with self._lock:
            self._out.flush()


# -- human-readable lines -------------------------------------------------------------------

def access_name(entry: dict) -> str:
    """Where an IO/MMIO access went: ``COM1.LSR``, ``boot-timer port 0x3f0``, ``unassigned port
    0x3f4``, ``MMIO 0xd0000000 (unassigned)``."""
    device = entry.get("device")
    register = entry.get("register")
    if entry.get("reason") == "MMIO":
        where = f"{_hex(entry.get('addr'))}"
        if device in (None, "unassigned"):
            return f"MMIO {where} (unassigned)"
        return f"{device}.{register}" if register else f"{device} MMIO {where}"
    where = _hex(entry.get("port"))
    if device in (None, "unassigned"):
        return f"unassigned port {where}"
    return f"{device}.{register}" if register else f"{device} port {where}"


def describe(entry: dict) -> str:
    """The ``what`` of a trace line (works on lines written before ``what`` existed)."""
    reason = entry.get("reason", "?")
    if reason in ("IO", "MMIO"):
        return _describe_access(entry)
    if reason == "SHUTDOWN":
        return "SHUTDOWN (triple fault)"
    if reason == "INTERNAL_ERROR":
        sub = entry.get("suberror")
        try:
            text = f"INTERNAL_ERROR {InternalSuberror(sub).name}"
        except ValueError:
            text = f"INTERNAL_ERROR suberror {sub}"
        if entry.get("insn_bytes"):
            text += f", instruction bytes {entry['insn_bytes']}"
        return text
    if reason == "FAIL_ENTRY":
        return (f"FAIL_ENTRY hardware entry failure reason {_hex(entry.get('hardware_reason'))}"
                f" on cpu {entry.get('cpu')}")
    if reason == "SYSTEM_EVENT":
        t = entry.get("type")
        name = SYSTEM_EVENTS.get(t)
        return f"SYSTEM_EVENT {name} ({t})" if name else f"SYSTEM_EVENT type {t}"
    if reason == "DEBUG":
        exc = entry.get("exception")
        name = {1: "#DB", 3: "#BP"}.get(exc, f"vector {exc}")
        return f"DEBUG {name} at {_hex(entry.get('pc'))}, dr6 {_hex(entry.get('dr6'))}"
    if reason == "UNKNOWN":
        return (f"UNKNOWN exit {entry.get('code')}, hardware exit reason "
                f"{_hex(entry.get('hardware_reason'))}")
    return str(reason)


def _describe_access(entry: dict) -> str:
    size = entry.get("size") or 0
    write = entry.get("dir") == "out"
    data = entry.get("data")
    values = data if isinstance(data, list) else [data]
    count = entry.get("count", 1)
    text = access_name(entry) + (" write" if write else " read")
    if entry.get("reason") == "MMIO" or size != 1:
        text += f" {size} byte{'s' if size != 1 else ''}"
    if isinstance(data, list):   # string I/O, or an access cut short ([])
        if count and count > 1:
            text += f" x{count}"
        shown = " ".join(_hex(v) for v in values[:_VALUES_SHOWN])
        if len(values) > _VALUES_SHOWN:
            shown += f" ... ({len(values)} values)"
        chars = _chars(values) if size == 1 else None
        if not values:
            shown = "?"
        elif chars is not None:
            shown += f" {chars}"
        return f"{text} {shown}" if write else f"{text} -> {shown}"
    if write:
        char = _chars(values) if size == 1 else None
        return f"{text} {_hex(data)}" + (f" {char}" if char else "")
    return f"{text} -> {_hex(data)}"


def _chars(values: list) -> str | None:
    """``'A'`` / ``'string io\\n'`` when every byte is printable ASCII or \\n \\r \\t."""
    if not values or not all(isinstance(v, int) and (0x20 <= v < 0x7F or v in (9, 10, 13))
                             for v in values):
        return None
    return repr("".join(map(chr, values)))


def _hex(v) -> str:
    return f"{v:#x}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

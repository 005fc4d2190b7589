"""Reading exit traces (kvmpy/vmexit/trace.py): a summary table, a plot, ``kvmpy trace summarize``.

:func:`analyze` reads a trace into a :class:`Summary`: exits by reason, by device and by
register (an IO/MMIO access's device and register, or its port or address when the device names
no register), each with a count and a *time share*, and the trace's span and exit rate.
:func:`summarize` formats it as a table; :func:`plot` draws it with matplotlib (an optional
dependency: ``pip install kvmpy[plot]``).

Time share. A trace has one timestamp per exit and nothing else, so time is attributed by gaps:
the time from an exit to the next exit *of the same vCPU* is charged to the first exit's kind.
That gap is what the exit cost after it happened: kvmpy handling it (device model, trace line),
KVM_RUN re-entering the guest, and the guest running until it exits again. A kind with a large
share is either expensive to handle or followed by long guest runs (a HLT that waits for an
interrupt, a guest that computes between two OUTs); compare it with the kind's share of the
exits. The last exit of each vCPU has no successor and is charged nothing, so shares add up to
100% of the sum of the gaps. Tracing itself makes every exit slower (KVM_GET_REGS and a JSON
line per exit), so absolute times are those of a traced run.

Lines that cannot be read (a last line cut short because the VM was killed while writing it,
garbage) are skipped and counted, never fatal.

Not here: per-instruction profiles (traces have no samples between exits), live tracing.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import sys
from dataclasses import dataclass, field

from kvmpy.errors import KvmpyError
from kvmpy.vmexit.trace import access_name

PLOT_MISSING = "install kvmpy[plot] (matplotlib) for --plot"
_ROWS = 30   # rows of the register table before "... N more"


class TraceError(KvmpyError):
    """A trace file that cannot be read at all."""


class PlotUnavailable(KvmpyError):
    """matplotlib is not installed."""

    def __init__(self) -> None:
        super().__init__(PLOT_MISSING)


@dataclass
class Row:
    """One kind of exit: how many, the time charged to it, and (registers) how many accesses:
    a string I/O exit (``rep insb``) is one exit of ``count`` accesses."""

    exits: int = 0
    time: float = 0.0
    accesses: int = 0


@dataclass
class Summary:
    path: str
    exits: int = 0
    first_t: float | None = None
    last_t: float | None = None
    vcpus: set = field(default_factory=set)
    by_reason: dict = field(default_factory=lambda: collections.defaultdict(Row))
    by_device: dict = field(default_factory=lambda: collections.defaultdict(Row))
    by_register: dict = field(default_factory=lambda: collections.defaultdict(Row))
    bad_lines: int = 0
    truncated_last: bool = False
    attributed: float = 0.0   # sum of all gaps: the denominator of time shares

    @property
    def duration(self) -> float:
        """Seconds from the first exit to the last."""
        if self.first_t is None:
            return 0.0
        return self.last_t - self.first_t

    @property
    def rate(self) -> float | None:
        """Exits per second between the first and the last exit: (exits - 1) / duration."""
        if self.exits < 2 or self.duration <= 0:
            return None
        return (self.exits - 1) / self.duration


def exit_kind(entry: dict) -> str:
    """The kind a trace line is plotted as: ``IO COM1``, ``MMIO unassigned``, ``HLT``."""
    reason = entry.get("reason", "?")
    if reason in ("IO", "MMIO"):
        return f"{reason} {entry.get('device', 'unassigned')}"
    return str(reason)


def register_kind(entry: dict) -> str:
    """``COM1.LSR read``, ``unassigned port 0x3f4 write``..."""
    return f"{access_name(entry)} {'write' if entry.get('dir') == 'out' else 'read'}"


def read_trace(path: str | os.PathLike, skipped: list | None = None):
    """Yield the trace's exits (dicts with at least ``reason`` and a numeric ``t``), in file
    order. Unreadable lines are skipped; each is appended to ``skipped`` as (line number,
    whether it ended with a newline)."""
    path = os.fspath(path)
    try:
        f = open(path, encoding="utf-8", errors="replace")
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    with f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                entry = json.loads(line)
            except ValueError:
                entry = None
            if (not isinstance(entry, dict) or "reason" not in entry
                    or not isinstance(entry.get("t"), (int, float))):
                if skipped is not None:
                    skipped.append((n, line.endswith("\n")))
                continue
            yield entry


def analyze(path: str | os.PathLike) -> Summary:
    """Read the trace at ``path`` into a :class:`Summary` (one pass, constant memory per kind)."""
    s = Summary(os.fspath(path))
    skipped: list = []
    pending: dict = {}   # vcpu -> (t, reason row, device row, register row) of its last exit
    for e in read_trace(path, skipped):
        t = float(e["t"])
        vcpu = e.get("vcpu")
        s.exits += 1
        s.vcpus.add(vcpu)
        s.first_t = t if s.first_t is None else min(s.first_t, t)
        s.last_t = t if s.last_t is None else max(s.last_t, t)
        rows = [s.by_reason[str(e["reason"])]]
        if e["reason"] in ("IO", "MMIO"):
            rows.append(s.by_device[exit_kind(e)])
            reg = s.by_register[register_kind(e)]
            data = e.get("data")
            reg.accesses += e.get("count") or (len(data) if isinstance(data, list) else 1)
            rows.append(reg)
        for r in rows:
            r.exits += 1
        prev = pending.get(vcpu)
        if prev is not None:
            gap = max(0.0, t - prev[0])
            for r in prev[1]:
                r.time += gap
            s.attributed += gap
        pending[vcpu] = (t, rows)
    s.bad_lines = len(skipped)
    s.truncated_last = bool(skipped) and not skipped[-1][1]
    return s


def summarize(path: str | os.PathLike, rows: int = _ROWS) -> str:
    """The summary table of the trace at ``path`` (see the module docstring for time share)."""
    return format_summary(analyze(path), rows)


def format_summary(s: Summary, rows: int = _ROWS) -> str:
    out: list[str] = []
    if s.exits == 0:
        out.append(f"trace {s.path}: no exits recorded")
    else:
        rate = f"{s.rate:,.0f} exits/s" if s.rate is not None else "rate n/a"
        vcpus = len(s.vcpus)
        out.append(f"trace {s.path}: {s.exits} exits in {s.duration:.6f} s ({rate}), "
                   f"{vcpus} vCPU{'s' if vcpus != 1 else ''}; first exit at "
                   f"t={s.first_t:.6f} s")
        out.append(_table("exits by reason", s.by_reason, s))
        if s.by_device:
            out.append(_table("exits by device (IO and MMIO)", s.by_device, s))
        if s.by_register:
            out.append(_table("exits by register or address", s.by_register, s, rows,
                              accesses=True))
        out.append("\ntime share: the time from each exit to the same vCPU's next exit, charged "
                   "to the exit's kind")
    if s.bad_lines:
        note = f"skipped {s.bad_lines} unreadable line{'s' if s.bad_lines != 1 else ''}"
        if s.truncated_last:
            note += " (the last line is cut short: the VM ended while it was written)"
        out.append(note)
    return "\n".join(out) + "\n"


def _table(title: str, table: dict, s: Summary, limit: int | None = None,
           accesses: bool = False) -> str:
    items = sorted(table.items(), key=lambda kv: (-kv[1].exits, kv[0]))
    width = max([len(title) - 2] + [len(k) for k, _ in items[:limit]]) + 2
    head = f"{title:<{width}}{'exits':>10}{'% exits':>9}{'time share':>12}{'us/exit':>10}"
    if accesses:
        head += f"{'accesses':>10}"
    lines = ["", head]
    for key, r in items[:limit]:
        share = f"{100 * r.time / s.attributed:.1f}%" if s.attributed > 0 else "-"
        per = f"{1e6 * r.time / r.exits:.1f}" if r.exits and s.attributed > 0 else "-"
        line = (f"  {key:<{width - 2}}{r.exits:>10}{100 * r.exits / s.exits:>8.1f}%"
                f"{share:>12}{per:>10}")
        if accesses:
            line += f"{r.accesses:>10}"
        lines.append(line)
    if limit is not None and len(items) > limit:
        rest = items[limit:]
        lines.append(f"  ... {len(rest)} more, {sum(r.exits for _, r in rest)} exits")
    return "\n".join(lines)


# -- plot -----------------------------------------------------------------------------------

def _matplotlib_figure():
    try:
        from matplotlib.figure import Figure
    except ImportError:
        raise PlotUnavailable() from None
    return Figure


def plot_available() -> bool:
    try:
        _matplotlib_figure()
    except PlotUnavailable:
        return False
    return True


def plot(path: str | os.PathLike, out_png: str | os.PathLike, max_kinds: int = 40) -> None:
    """Draw the trace at ``path`` into ``out_png``: a timeline (time vs. exit kind, one dot per
    exit, a colour per vCPU) above a histogram of exits by kind. Kinds are ``exit_kind``s; past
    ``max_kinds`` the rarest are drawn as "other". Raises PlotUnavailable without matplotlib."""
    Figure = _matplotlib_figure()   # before reading a large trace
    ts: list[float] = []
    kinds: list[str] = []
    vcpus: list = []
    for e in read_trace(path):
        ts.append(float(e["t"]))
        kinds.append(exit_kind(e))
        vcpus.append(e.get("vcpu"))
    counts = collections.Counter(kinds)
    order = [k for k, _ in counts.most_common()]
    if len(order) > max_kinds:
        keep = set(order[:max_kinds - 1])
        kinds = [k if k in keep else "other" for k in kinds]
        counts = collections.Counter(kinds)
        order = [k for k, _ in counts.most_common()]
    row = {k: i for i, k in enumerate(order)}

    fig = Figure(figsize=(11, 3 + 0.45 * max(len(order), 1)), layout="constrained")
    timeline, hist = fig.subplots(2, 1, height_ratios=[2, 1])
    name = os.path.basename(os.fspath(path))
    if not ts:
        timeline.set_title(f"{name}: no exits recorded")
    for v in sorted(set(vcpus), key=str):
        xs = [t for t, c in zip(ts, vcpus) if c == v]
        ys = [row[k] for k, c in zip(kinds, vcpus) if c == v]
        timeline.scatter(xs, ys, s=6, marker="|" if len(xs) > 5000 else "o",
                         label=f"vCPU {v}", rasterized=len(xs) > 5000)
    timeline.set_yticks(range(len(order)), order)
    timeline.invert_yaxis()
    timeline.set_xlabel("time since the trace began (s)")
    if ts:
        timeline.set_title(f"{name}: {len(ts)} exits")
        if len(set(vcpus)) > 1:
            timeline.legend(loc="upper right")
    timeline.grid(axis="x", alpha=0.3)

    values = [counts[k] for k in order]
    hist.barh(range(len(order)), values)
    hist.set_yticks(range(len(order)), order)
    hist.invert_yaxis()
    hist.set_title("exits by kind")
    hist.set_xlabel("exits")
    if values and max(values) > 100 * max(min(values), 1):
        hist.set_xscale("log")
    for i, v in enumerate(values):
        hist.annotate(str(v), (v, i), xytext=(3, 0), textcoords="offset points",
                      va="center", fontsize=8)
    fig.savefig(os.fspath(out_png), dpi=100)


# -- the command ----------------------------------------------------------------------------

def add_summarize_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("file", metavar="FILE", help="a trace written by --trace FILE")
    p.add_argument("--plot", metavar="PNG",
                   help="also draw a timeline and a histogram of the exits into PNG "
                   "(needs matplotlib: pip install kvmpy[plot])")
    p.add_argument("--explain", action="store_true",
                   help="append what each exit reason in the trace means (kvmpy explain)")


def run_summarize(file: str, plot_png: str | None = None, explain: bool = False,
                  out=None) -> int:
    """``kvmpy trace summarize``: print the summary; 0, or 2 with a one-line error."""
    out = out if out is not None else sys.stdout
    try:
        if plot_png and not plot_available():
            raise PlotUnavailable()
        s = analyze(file)
        text = format_summary(s)
        if explain and s.by_reason:
            from kvmpy.explain import explain as explain_reason

            for reason in sorted(s.by_reason, key=lambda k: -s.by_reason[k].exits):
                try:
                    text += "\n" + explain_reason(reason)
                except KvmpyError:
                    text += f"\n{reason}: not a KVM exit reason kvmpy knows\n"
        out.write(text)
        if plot_png:
            plot(file, plot_png)
            out.write(f"plot written to {plot_png}\n")
    except KvmpyError as e:
        print(f"kvmpy: {e}", file=sys.stderr)
        return 2
    return 0


def main_summarize(argv: list[str] | None = None) -> int:
    """``kvmpy trace summarize FILE [--plot PNG] [--explain]``; argv is what follows
    ``summarize``."""
    p = argparse.ArgumentParser(prog="kvmpy trace summarize",
                                description="Summarize an exit trace: exits by reason, device "
                                "and register, with counts and time shares.")
    add_summarize_arguments(p)
    args = p.parse_args(argv)
    return run_summarize(args.file, args.plot, args.explain)


if __name__ == "__main__":
    sys.exit(main_summarize())

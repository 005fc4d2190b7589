"""Exit traces for people: the ``what`` and ``sym`` fields (kvmpy/vmexit/trace.py), symbol tables
(kvmpy/symbols.py) and trace summaries and plots (kvmpy/tracetools.py), on traces of guests that
really ran."""
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import run_kvmpy
from kvmpy import tracetools
from kvmpy.builder import FlatConfig, build_flat
from kvmpy.symbols import START_KERNEL_MAP, SymbolsError, from_image, load, parse_system_map
from kvmpy.vcpu.modes import Mode
from kvmpy.vmexit.bus import BusDevice
from kvmpy.vmexit.trace import Tracer, describe

HELLO = Path(__file__).parent.parent / "examples" / "01-real-mode-hello" / "hello.S"
HELLO_MSG = b"Hello from real mode! Each character cost two VM exits.\n"
LONG = 0x100000


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()]


def traced_run(tmp_path, image, mode, *extra, name="t.jsonl"):
    trace = tmp_path / name
    p = run_kvmpy("run", str(image), "--mode", mode, "--trace", str(trace), *extra)
    return p, trace


# -- the `what` field -----------------------------------------------------------------------

COM1_TOUR = r"""
        .code16
        mov $0x3fb, %dx
        mov $0x80, %al
        out %al, %dx                 /* LCR: DLAB on */
        mov $0x3f8, %dx
        mov $0x01, %al
        out %al, %dx                 /* DLL */
        mov $0x3f9, %dx
        mov $0x00, %al
        out %al, %dx                 /* DLM */
        mov $0x3fb, %dx
        mov $0x03, %al
        out %al, %dx                 /* LCR: 8N1, DLAB off */
        mov $0x3fa, %dx
        mov $0xc7, %al
        out %al, %dx                 /* FCR: FIFOs on */
        in %dx, %al                  /* IIR */
        mov $0x3f9, %dx
        mov $0x00, %al
        out %al, %dx                 /* IER */
        mov $0x3fc, %dx
        mov $0x0b, %al
        out %al, %dx                 /* MCR */
        mov $0x3fe, %dx
        in %dx, %al                  /* MSR */
        mov $0x3fd, %dx
        in %dx, %al                  /* LSR */
        mov $0x3f8, %dx
        in %dx, %al                  /* RBR (nothing received) */
        mov $0x3ff, %dx
        mov $'Z', %al
        out %al, %dx                 /* SCR */
        in %dx, %al
        mov $0x3f8, %dx
        mov $'A', %al
        out %al, %dx                 /* THR */
        mov $0x3f4, %dx
        in %dx, %al                  /* nobody's port */
        mov $0x1234, %dx
        in %dx, %ax
        EXIT 0x10
"""


def test_what_names_every_com1_register(build_guest, tmp_path):
    p, trace = traced_run(tmp_path, build_guest("com1_tour", source=COM1_TOUR), "real")
    assert p.returncode == 0x21, p.stderr
    assert p.stdout == b"A"
    whats = [r["what"] for r in records(trace)]
    assert whats == [
        "COM1.LCR write 0x80",
        "COM1.DLL write 0x1",
        "COM1.DLM write 0x0",
        "COM1.LCR write 0x3",
        "COM1.FCR write 0xc7",
        "COM1.IIR read -> 0xc1",        # FIFOs enabled, no interrupt pending
        "COM1.IER write 0x0",
        "COM1.MCR write 0xb",
        "COM1.MSR read -> 0xb0",        # DCD | DSR | CTS: the null modem
        "COM1.LSR read -> 0x60",        # THRE | TEMT
        "COM1.RBR read -> 0x0",
        "COM1.SCR write 0x5a 'Z'",
        "COM1.SCR read -> 0x5a",
        "COM1.THR write 0x41 'A'",
        "unassigned port 0x3f4 read -> 0xff",
        "unassigned port 0x1234 read 2 bytes -> 0xffff",
        "debug-exit.EXIT write 0x10",
    ]


def test_what_of_hello_and_the_old_fields_are_unchanged(tmp_path):
    p, trace = traced_run(tmp_path, HELLO, "real")
    assert p.stdout == HELLO_MSG and p.returncode == 0
    recs = records(trace)
    assert recs[0]["what"] == "COM1.LSR read -> 0x60"
    assert recs[1]["what"] == "COM1.THR write 0x48 'H'"
    assert recs[-2]["what"] == "COM1.THR write 0xa '\\n'"
    assert recs[-1]["what"] == "HLT"
    # backwards compatible: the fields readers used are all there, `sym` only with symbols
    assert {k: recs[1][k] for k in ("reason", "port", "size", "dir", "count", "data", "device",
                                    "register", "vcpu")} == {
        "reason": "IO", "port": 0x3F8, "size": 1, "dir": "out", "count": 1, "data": 0x48,
        "device": "COM1", "register": "THR", "vcpu": 0}
    assert all(isinstance(r["t"], float) and isinstance(r["rip"], int) for r in recs)
    assert not any("sym" in r for r in recs)
    # describe() gives an old line (no `what`) the same text
    assert all(describe({k: v for k, v in r.items() if k != "what"}) == r["what"] for r in recs)


def test_what_of_string_io(build_guest, tmp_path):
    p, trace = traced_run(tmp_path, build_guest("strio"), "real")
    assert p.returncode == 0x21
    scr = [r["what"] for r in records(trace) if r.get("register") == "SCR" and r["dir"] == "in"]
    assert scr == ["COM1.SCR read x4 -> 0x5a 0x5a 0x5a 0x5a 'ZZZZ'"]


def test_what_of_mmio(build_guest, tmp_path):
    p, trace = traced_run(tmp_path, build_guest("mmio", LONG), "long")
    assert p.returncode == 0x21, p.stderr
    mm = [r["what"] for r in records(trace) if r["reason"] == "MMIO"]
    assert mm == [
        "MMIO 0xd0000000 (unassigned) write 4 bytes 0x12345678",
        "MMIO 0xd0000000 (unassigned) read 4 bytes -> 0xffffffff",
        "MMIO 0xd0001000 (unassigned) write 4 bytes 0xcafe0001",
        "MMIO 0xd0001000 (unassigned) read 4 bytes -> 0xffffffff",
        "MMIO 0xd0001004 (unassigned) write 1 byte 0x42 'B'",
        "MMIO 0xd0001004 (unassigned) read 1 byte -> 0xff",
    ]


class Plain(BusDevice):
    """An MMIO device that names no registers."""

    name = "plain"
    window = 0x10

    def read(self, offset, size):
        return 0x11


def test_what_of_a_device_without_register_names(build_guest, tmp_path):
    trace = tmp_path / "t.jsonl"
    with open(trace, "w") as f:
        tracer = Tracer(f)
        with build_flat(FlatConfig(build_guest("mmio", LONG), Mode.LONG, console_sink=[].append,
                                   tracer=tracer)) as m:
            m.add_mmio_device(Plain(), 0xD000_1000)
            m.start(m.setup)
            assert m.wait(20).status == 0x21
        tracer.close()
    mm = [r["what"] for r in records(trace) if r["reason"] == "MMIO"]
    assert mm[2:4] == ["plain MMIO 0xd0001000 write 4 bytes 0xcafe0001",
                       "plain MMIO 0xd0001000 read 4 bytes -> 0x11"]


def test_describe_other_exits():
    assert describe({"reason": "SHUTDOWN"}) == "SHUTDOWN (triple fault)"
    assert describe({"reason": "INTERNAL_ERROR", "suberror": 1, "insn_bytes": "cc 90"}) == \
        "INTERNAL_ERROR EMULATION, instruction bytes cc 90"
    assert describe({"reason": "INTERNAL_ERROR", "suberror": 99}) == "INTERNAL_ERROR suberror 99"
    assert describe({"reason": "SYSTEM_EVENT", "type": 2}) == "SYSTEM_EVENT RESET (2)"
    assert describe({"reason": "FAIL_ENTRY", "hardware_reason": 0x80000021, "cpu": 3}) == \
        "FAIL_ENTRY hardware entry failure reason 0x80000021 on cpu 3"
    assert describe({"reason": "DEBUG", "exception": 1, "pc": 0x7C00, "dr6": 0x4000}) == \
        "DEBUG #DB at 0x7c00, dr6 0x4000"
    assert describe({"reason": "IO", "port": 0x3F8, "size": 1, "dir": "in", "count": 1,
                     "data": [], "device": "COM1", "register": "RBR"}) == "COM1.RBR read -> ?"


# -- symbols ---------------------------------------------------------------------------------

needs_binutils = pytest.mark.skipif(not all(shutil.which(t) for t in ("as", "ld", "nm",
                                                                        "objcopy")),
                                    reason="needs binutils (as, ld, nm, objcopy)")

# hello.S with a label on the OUT, so every exit's RIP has a name to check against
HELLO_LABELLED = HELLO.read_text().replace("        out %al, %dx            /* VM exit",
                                           "put:    out %al, %dx            /* VM exit")


def link(tmp_path, source, base=0x7C00, name="g", extra_ld=(), bits=64):
    """Assemble and link ``source`` into an ELF with real symbols; return (elf, flat binary)."""
    src, obj = tmp_path / f"{name}.S", tmp_path / f"{name}.o"
    elf, flat = tmp_path / f"{name}.elf", tmp_path / f"{name}.bin"
    src.write_text(source + "\n")
    subprocess.run(["as", f"--{bits}", "-o", obj, src], check=True)
    emul = "elf_x86_64" if bits == 64 else "elf_i386"
    subprocess.run(["ld", "-m", emul, "-nostdlib", "-N", f"-Ttext={base:#x}", "-e", f"{base:#x}",
                    *extra_ld, "-o", elf, obj], check=True)
    subprocess.run(["objcopy", "-O", "binary", elf, flat], check=True)
    return elf, flat


def nm(elf):
    out = subprocess.run(["nm", "-n", elf], capture_output=True, text=True, check=True).stdout
    return {parts[2]: int(parts[0], 16) for parts in (line.split() for line in out.splitlines())
            if len(parts) == 3}


def run_with_symbols(tmp_path, flat, symbols, mode=Mode.REAL, load_addr=None):
    trace = tmp_path / "sym.jsonl"
    out = []
    with open(trace, "w") as f:
        tracer = Tracer(f, symbols=symbols)
        with build_flat(FlatConfig(str(flat), mode, load=load_addr,
                                   console_sink=out.append, tracer=tracer)) as m:
            m.start(m.setup)
            outcome = m.wait(20)
        tracer.close()
    return outcome, b"".join(out), records(trace)


def check_hello_syms(recs, addrs):
    lsr = {r["sym"] for r in recs if r.get("register") == "LSR"}
    thr = {r["sym"] for r in recs if r.get("register") == "THR"}
    # RIP is the instruction or the one after it (1 byte each here), depending on the KVM:
    # current KVM on VT-x/AMD-V completes IN and OUT on re-entry and skips HLT before it exits
    assert len(lsr) == 1 and lsr <= {"wait+0x0", "wait+0x1"}
    assert len(thr) == 1 and thr <= {"put+0x0", "put+0x1"}
    hlt = [r for r in recs if r["reason"] == "HLT"]
    # `done: cli; hlt` and `message` right after the hlt
    assert len(hlt) == 1 and hlt[0]["sym"] in {"done+0x1", "message+0x0"}
    assert all(r["rip"] == addrs[r["sym"].split("+")[0]] + int(r["sym"].split("+")[1], 16)
               for r in recs)


@needs_binutils
def test_symbols_from_an_elf_linked_with_ld(tmp_path):
    elf, flat = link(tmp_path, HELLO_LABELLED)
    addrs = nm(elf)
    table = load(elf)
    for name in ("next", "wait", "put", "done", "message"):
        assert table.lookup(addrs[name]) == f"{name}+0x0"
    assert table.lookup(addrs["wait"] + 3) == "wait+0x3"
    assert table.lookup(0x7000) is None                      # below every symbol
    assert table.lookup(0x7C00 + flat.stat().st_size + 0x1000) is None   # past .text
    outcome, out, recs = run_with_symbols(tmp_path, flat, str(elf))
    assert out == HELLO_MSG and outcome.status == 0
    assert len(recs) == 2 * len(HELLO_MSG) + 1
    check_hello_syms(recs, addrs)


@needs_binutils
def test_symbols_from_a_system_map(tmp_path):
    elf, flat = link(tmp_path, HELLO_LABELLED)
    addrs = nm(elf)
    system_map = tmp_path / "System.map"
    nm_text = subprocess.run(["nm", "-n", elf], capture_output=True, text=True).stdout
    system_map.write_text("this line is not a symbol\n" + nm_text)
    outcome, out, recs = run_with_symbols(tmp_path, flat, system_map)
    assert out == HELLO_MSG and outcome.status == 0
    check_hello_syms(recs, addrs)


def test_system_map_rules():
    table = parse_system_map(
        "ffffffff81000000 T _text\n"
        "ffffffff81000000 T startup_64\n"
        "ffffffff81000070 t secondary_startup_64\n"
        "ffffffff81000100 D some_data\n"         # not code: ignored
        "0000000000000000 A __per_cpu_start\n"  # absolute: ignored
        "ffffffff81000200 T _etext\n")
    assert len(table) == 3
    assert table.lookup(0xFFFFFFFF8100001A) == "startup_64+0x1a"   # not `_text`
    assert table.lookup(0xFFFFFFFF81000150) == "secondary_startup_64+0xe0"
    assert table.lookup(0xFFFFFFFF81000200) == "_etext+0x0"
    assert table.lookup(0xFFFFFFFF81000201) is None   # past the highest: no size to go by
    assert table.lookup(0xFFFFFFFF80FFFFFF) is None
    # before paging, a kernel runs at its physical address: named through the kernel map
    assert table.lookup(0x100001A) == "startup_64+0x1a"
    assert table.lookup(0x7C00) is None
    assert table.lookup(None) is None
    assert START_KERNEL_MAP == 0xFFFFFFFF80000000


@needs_binutils
def test_elf_physical_addresses_name_through_program_headers(tmp_path):
    script = tmp_path / "k.ld"
    script.write_text("SECTIONS { . = 0xffffffff81000000; "
                      ".text : AT(0x1000000) { *(.text) } }\n")
    src = ".code64\n.globl startup_64\nstartup_64: nop\nnop\nloop: jmp loop\n"
    elf, _ = link(tmp_path, src, base=0xFFFFFFFF81000000, name="k", extra_ld=("-T", script))
    table = load(elf)
    assert table.lookup(0xFFFFFFFF81000001) == "startup_64+0x1"
    assert table.lookup(0x1000002) == "loop+0x0"     # physical: p_paddr -> p_vaddr
    assert table.lookup(0x2000000) is None


@needs_binutils
def test_elf32_and_images_without_symbols(tmp_path):
    src = ".code32\n.globl _start\n_start: nop\nspin: jmp spin\n"
    elf, flat = link(tmp_path, src, base=0x100000, name="m", bits=32)
    table = load(elf)
    assert table.lookup(0x100001) == "spin+0x0"
    assert from_image(elf).lookup(0x100000) == "_start+0x0"
    assert from_image(flat) is None                  # a flat binary
    stripped = tmp_path / "stripped.elf"
    subprocess.run(["strip", "-o", stripped, elf], check=True)
    assert from_image(stripped) is None
    with pytest.raises(SymbolsError, match="without a symbol table"):
        load(stripped)


def test_bad_symbol_sources_are_one_line_errors(tmp_path):
    with pytest.raises(SymbolsError, match="cannot read symbols"):
        load(tmp_path / "missing.map")
    junk = tmp_path / "junk.map"
    junk.write_text("hello\nworld\n")
    with pytest.raises(SymbolsError, match="no code symbols"):
        load(junk)
    truncated = tmp_path / "trunc.elf"
    truncated.write_bytes(b"\x7fELF\x02\x01\x01" + b"\0" * 30)
    with pytest.raises(SymbolsError, match="truncated or malformed"):
        load(truncated)
    with open(tmp_path / "t.jsonl", "w") as f, pytest.raises(SymbolsError):
        Tracer(f, symbols=str(junk))        # at once, not at the first exit


# -- summaries ---------------------------------------------------------------------------------

def test_summary_of_hello_counts_two_io_exits_per_character(tmp_path):
    p, trace = traced_run(tmp_path, HELLO, "real")
    assert p.returncode == 0
    n = len(HELLO_MSG)
    s = tracetools.analyze(trace)
    assert s.exits == 2 * n + 1
    assert {k: r.exits for k, r in s.by_reason.items()} == {"IO": 2 * n, "HLT": 1}
    assert {k: r.exits for k, r in s.by_device.items()} == {"IO COM1": 2 * n}
    assert {k: r.exits for k, r in s.by_register.items()} == {"COM1.LSR read": n,
                                                              "COM1.THR write": n}
    assert s.vcpus == {0} and s.bad_lines == 0
    # time shares add up to the sum of gaps; the last exit (HLT) is charged nothing
    assert s.by_reason["HLT"].time == 0
    assert s.by_reason["IO"].time == pytest.approx(s.attributed)
    assert s.attributed == pytest.approx(s.duration)
    text = tracetools.summarize(trace)
    assert re.search(rf"{s.exits} exits in [\d.]+ s \([\d,]+ exits/s\), 1 vCPU", text)
    assert re.search(rf"^  IO\s+{2 * n}\s+[\d.]+%\s+100\.0%", text, re.M), text
    assert re.search(r"^  HLT\s+1\s+[\d.]+%\s+0\.0%", text, re.M)
    assert re.search(rf"^  COM1\.LSR read\s+{n}\s", text, re.M)
    assert re.search(rf"^  COM1\.THR write\s+{n}\s", text, re.M)


def test_summary_of_string_io_counts_accesses(build_guest, tmp_path):
    p, trace = traced_run(tmp_path, build_guest("strio"), "real")
    assert p.returncode == 0x21
    s = tracetools.analyze(trace)
    # `rep outsb` exits once per byte or in batches depending on the host's KVM; the bytes
    # reaching THR do not: "string io\n", "ZZZZ", "\n"
    assert s.by_register["COM1.THR write"].accesses == 15
    assert s.by_register["COM1.SCR read"].exits == 1
    assert s.by_register["COM1.SCR read"].accesses == 4
    assert s.by_register["debug-exit.EXIT write"].exits == 1


def test_summary_of_unassigned_ports_and_mmio(build_guest, tmp_path):
    p, trace = traced_run(tmp_path, build_guest("unclaimed"), "real", name="u.jsonl")
    assert p.returncode == 0x21
    regs = {k: r.exits for k, r in tracetools.analyze(trace).by_register.items()}
    assert regs["unassigned port 0x3f4 read"] == 1
    assert regs["unassigned port 0x3f2 write"] == 1
    assert regs["unassigned port 0x1234 read"] == 2
    p, trace = traced_run(tmp_path, build_guest("mmio", LONG), "long", name="m.jsonl")
    s = tracetools.analyze(trace)
    assert s.by_reason["MMIO"].exits == 6
    assert s.by_device["MMIO unassigned"].exits == 6
    assert s.by_register["MMIO 0xd0001004 (unassigned) write"].exits == 1
    assert "MMIO 0xd0000000 (unassigned) read" in tracetools.summarize(trace)


def test_time_share_is_charged_per_vcpu_to_the_exit_before_the_gap(tmp_path):
    trace = tmp_path / "t.jsonl"
    lines = [  # vCPU 0: A(0) B(1) A(4); vCPU 1: C(0.5) C(2.5)
        {"reason": "IO", "t": 0.0, "vcpu": 0, "port": 1, "dir": "in", "device": "A"},
        {"reason": "MMIO", "t": 0.5, "vcpu": 1, "addr": 16, "dir": "out", "device": "C"},
        {"reason": "IO", "t": 1.0, "vcpu": 0, "port": 2, "dir": "out", "device": "B"},
        {"reason": "MMIO", "t": 2.5, "vcpu": 1, "addr": 16, "dir": "out", "device": "C"},
        {"reason": "HLT", "t": 4.0, "vcpu": 0},
    ]
    trace.write_text("".join(json.dumps(x) + "\n" for x in lines))
    s = tracetools.analyze(trace)
    assert s.attributed == pytest.approx(1 + 3 + 2)
    assert s.by_device["IO A"].time == pytest.approx(1)
    assert s.by_device["IO B"].time == pytest.approx(3)
    assert s.by_device["MMIO C"].time == pytest.approx(2)
    assert s.by_reason["HLT"].time == 0
    assert s.duration == 4 and s.rate == pytest.approx(1.0) and s.vcpus == {0, 1}
    text = tracetools.summarize(trace)
    assert re.search(r"^  IO\s+2\s+40\.0%\s+66\.7%", text, re.M), text
    assert re.search(r"^  MMIO\s+2\s+40\.0%\s+33\.3%", text, re.M)
    assert "2 vCPUs" in text


def test_truncated_last_line_and_garbage_are_skipped(tmp_path):
    p, trace = traced_run(tmp_path, HELLO, "real")
    text = trace.read_text()
    cut = tmp_path / "cut.jsonl"
    cut.write_text(text[:-20])                        # the HLT line, cut short
    s = tracetools.analyze(cut)
    assert s.exits == 2 * len(HELLO_MSG) and "HLT" not in s.by_reason
    assert s.bad_lines == 1 and s.truncated_last
    assert "the last line is cut short" in tracetools.summarize(cut)
    messy = tmp_path / "messy.jsonl"
    messy.write_text("not json\n[1, 2]\n{\"no\": \"reason\"}\n\n" + text)
    s = tracetools.analyze(messy)
    assert s.exits == 2 * len(HELLO_MSG) + 1 and s.bad_lines == 3 and not s.truncated_last


def test_trace_with_no_exits(tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    assert tracetools.summarize(empty) == f"trace {empty}: no exits recorded\n"
    assert tracetools.analyze(empty).rate is None


def test_summarize_command(tmp_path, capsys):
    p, trace = traced_run(tmp_path, HELLO, "real")
    assert tracetools.main_summarize([str(trace), "--explain"]) == 0
    out = capsys.readouterr().out
    assert "exits by reason" in out
    assert "KVM_EXIT_IO (2):" in out and "KVM_EXIT_HLT (5):" in out
    assert out.index("KVM_EXIT_IO (2)") < out.index("KVM_EXIT_HLT (5)")   # most exits first
    assert tracetools.main_summarize([str(tmp_path / "missing.jsonl")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("kvmpy: cannot read trace") and err.count("\n") == 1


def test_summarize_as_a_user_runs_it(tmp_path):
    p, trace = traced_run(tmp_path, HELLO, "real")
    q = subprocess.run([sys.executable, "-m", "kvmpy.tracetools", str(trace)],
                       capture_output=True, text=True, timeout=60)
    assert q.returncode == 0, q.stderr
    assert re.search(rf"^  COM1\.THR write\s+{len(HELLO_MSG)}\s", q.stdout, re.M)


# -- plots -----------------------------------------------------------------------------------

def test_plot(tmp_path, build_guest):
    pytest.importorskip("matplotlib", reason="matplotlib is an optional dependency "
                        "(kvmpy[plot]); install it to test --plot")
    p, trace = traced_run(tmp_path, build_guest("com1_tour", source=COM1_TOUR), "real")
    png = tmp_path / "exits.png"
    tracetools.plot(trace, png)
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000
    png2 = tmp_path / "cmd.png"
    assert tracetools.run_summarize(str(trace), str(png2), out=open(tmp_path / "o", "w")) == 0
    assert png2.read_bytes()[:4] == b"\x89PNG"
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    tracetools.plot(empty, tmp_path / "empty.png")     # a figure that says so, not an error


def test_plot_without_matplotlib_is_a_one_line_error(tmp_path, monkeypatch, capsys):
    p, trace = traced_run(tmp_path, HELLO, "real")
    for mod in [m for m in sys.modules if m == "matplotlib" or m.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, mod)
    monkeypatch.setitem(sys.modules, "matplotlib", None)   # import matplotlib -> ImportError
    assert tracetools.main_summarize([str(trace), "--plot", str(tmp_path / "x.png")]) == 2
    captured = capsys.readouterr()
    assert captured.err == "kvmpy: install kvmpy[plot] (matplotlib) for --plot\n"
    assert captured.out == ""                    # checked before any output
    assert not (tmp_path / "x.png").exists()
    with pytest.raises(tracetools.PlotUnavailable):
        tracetools.plot(trace, tmp_path / "y.png")


def test_cli_wiring_trace_summarize_and_explain(tmp_path):
    from conftest import run_kvmpy
    from pathlib import Path

    hello = Path(__file__).parent.parent / "examples" / "01-real-mode-hello" / "hello.S"
    trace = tmp_path / "t.jsonl"
    assert run_kvmpy("run", str(hello), "--mode", "real", "--trace", str(trace)).returncode == 0
    p = run_kvmpy("trace", "summarize", str(trace), "--explain")
    out = p.stdout.decode()
    assert p.returncode == 0 and "COM1.LSR read" in out and "KVM_EXIT_HLT" in out
    p = run_kvmpy("explain", "KVM_EXIT_MMIO")
    assert p.returncode == 0 and b"EPT" in p.stdout
    p = run_kvmpy("explain", "bogus")
    assert p.returncode == 2 and p.stderr.decode().count("\n") == 1

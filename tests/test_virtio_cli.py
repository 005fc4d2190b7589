"""--disk/--rng/--transport/--device-map on the command line: layout, order, errors; guests
that drive virtio-blk themselves."""
import random
from pathlib import Path

import pytest

from conftest import pvh_kernel, run_kvmpy
from virtio_driver import bench_end, bench_expect

HELLO = str(Path(__file__).parent.parent / "examples" / "01-real-mode-hello" / "hello.S")


def test_device_map_keeps_command_line_order(tmp_path):
    disk = tmp_path / "d.img"
    disk.write_bytes(bytes(1 << 20))
    p = run_kvmpy("run", HELLO, "--mode", "real", "--rng", "--disk", f"{disk},ro",
                  "--device-map")
    assert p.returncode == 0, p.stderr
    err = p.stderr.decode()
    assert "virtio-mmio 0: 0xd0000000-0xd0000fff IRQ 5  virtio-rng" in err
    assert f"virtio-mmio 1: 0xd0001000-0xd0001fff IRQ 6  virtio-blk {disk} (ro)" in err
    assert err.index("0x03f8-0x03ff  COM1") > err.index("0x0060-0x0064  i8042")


def test_disk_errors_are_one_line(tmp_path):
    odd = tmp_path / "odd.img"
    odd.write_bytes(b"x" * 1000)   # not a multiple of 512
    for args, word in ((["--disk", str(tmp_path / "missing.img")], "does not exist"),
                       (["--disk", str(odd)], "512"),
                       (["--disk", f"{odd},bogus"], "unknown option")):
        p = run_kvmpy("run", HELLO, "--mode", "real", *args)
        err = p.stderr.decode()
        assert p.returncode == 2 and err.count("\n") == 1 and "Traceback" not in err, err
        assert word in err, err


def test_guest_drives_virtio_blk_itself(build_guest, tmp_path):
    disk = tmp_path / "disk.img"
    disk.write_bytes(b"BOOTSECT" + bytes(512 * 4 - 8))
    p = run_kvmpy("run", build_guest("virtio_blk_mmio", 0x100000), "--mode", "long",
                  "--disk", str(disk), "--timeout", "60")
    assert p.returncode == 0x21, (p.stdout, p.stderr)
    lines = p.stdout.decode().splitlines()
    # "BOOTSECT" as two little-endian dwords
    assert lines[0] == "read:" + "544f4f42" + "54434553" + "00000000"
    assert lines[1] == "write:00000000"            # VIRTIO_BLK_S_OK
    assert lines[2].startswith("flush:")           # UNSUPP (2) unless FLUSH was negotiated
    data = disk.read_bytes()
    assert data[512:520] == b"kvmpy!!\n" and data[:8] == b"BOOTSECT"


@pytest.mark.parametrize("engine,poll_us,irq", [("c", "50", 0), ("c", "0", 0),
                                                ("python", "50", 0), ("c", "50", 1),
                                                ("python", "0", 1)])
def test_cpl3_guest_reads_random_blocks(tmp_path, engine, poll_us, irq):
    """tests/guests/virtio_blk_bench.S (the virtio-blk benchmark's guest) through `kvmpy boot`:
    a PVH kernel that sets up long mode and the device at CPL0, then drives virtio-mmio from
    CPL3 (native speed on PVM): batches of 4 KiB reads at xorshift sectors, notify by
    ioeventfd; completions polled, or (irq=1) waited for in hlt until the used-buffer
    interrupt (irqfd -> IOAPIC -> vector 0x30, acknowledged at the transport and the LAPIC).
    Every status byte must be OK, and the blocks' bytes (the last batch's first block and an
    order-sensitive hash of every sector's first 8 bytes) must be the file's."""
    qd, nbatch, reps, nblocks = 8, 40, 2, 64
    disk = tmp_path / "disk.img"
    disk.write_bytes(random.Random(7).randbytes(nblocks * 4096))
    kernel = pvh_kernel("virtio_blk_bench", tmp_path, defsyms={
        "QD": qd, "NBATCH": nbatch, "REPS": reps, "NBLOCKS": nblocks, "IRQ": irq})
    p = run_kvmpy("boot", "--kernel", str(kernel), "--append", "x", "--mem", "64M",
                  "--transport", "mmio", "--disk", f"{disk},ro", "--timeout", "60",
                  env={"KVMPY_BLK_ENGINE": engine, "KVMPY_BLK_POLL_US": poll_us})
    lines = p.stdout.decode().splitlines()
    assert p.returncode == 0x21, (lines, p.stderr)
    assert lines[0] == "virtio-blk at d0000000 irq 00000005"     # slot 0: GSI 5
    assert lines[1:reps + 2] == ["t"] * (reps + 1)
    if irq:   # every batch waited for one at least (a lost one: the guest sleeps forever)
        assert lines[reps + 2].startswith("irqs:")
        assert int(lines[reps + 2][5:], 16) >= nbatch * reps, lines
    assert bench_end(lines[-1]) == bench_expect(disk.read_bytes(), qd * nbatch * reps, qd)

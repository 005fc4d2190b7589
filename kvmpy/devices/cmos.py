"""MC146818 real-time clock and its 128 bytes of CMOS RAM (ports 0x70/0x71 on a PC).

Offset 0 is the index register (write-only: reads return 0xff, as QEMU's cmos_ioport_read), offset 1
the data register. The index is 7 bits; bit 7 of an index write is the PC's NMI-disable bit, which
is recorded (``nmi_disabled``) but gates nothing, since kvmpy injects no NMIs from here.

Time comes from ``clock()`` (seconds since the epoch, UTC) plus an offset the guest sets: writes
to the time registers while SET (register B bit 7) is 1 are latched and become a new offset when
SET goes back to 0, and a write while the clock runs moves that one field at once, as QEMU's
hw/rtc/mc146818rtc.c does. Every read computes the time afresh, so the guest always sees the
host's clock, never a stale copy.

Register map (Motorola MC146818A datasheet, "Address Map"):
    0x00 seconds     0x01 seconds alarm   0x02 minutes   0x03 minutes alarm
    0x04 hours       0x05 hours alarm     0x06 day of week (1 = Sunday)
    0x07 day of month 0x08 month          0x09 year (00-99)
    0x0a-0x0d status registers A-D        0x0e-0x7f RAM; 0x32 is the century by the IBM AT
    convention that ACPI's FADT "CENTURY" field points at.

What it deliberately does not model: interrupts (no IRQ 8; register C's flags stay 0, so periodic,
alarm and update-ended interrupts never happen), the update cycle (UIP is always 0), the divider
chain (register A is stored only), daylight saving (DSE is stored only), and a separate
day-of-week counter (the day of week is computed from the date; a written value is ignored once
the clock runs). Alarm registers are plain RAM.

Accesses wider than one byte touch only the addressed register (its byte in the low 8 bits,
0xff above); an ISA bus would split them into byte accesses on 0x70 and 0x71.
"""
from __future__ import annotations

import threading
import time
from collections.abc import Callable

from kvmpy.vmexit.bus import BusDevice

INDEX = 0
DATA = 1

# Register indices (MC146818A "Address Map").
SECONDS = 0x00
SECONDS_ALARM = 0x01
MINUTES = 0x02
MINUTES_ALARM = 0x03
HOURS = 0x04
HOURS_ALARM = 0x05
DAY_OF_WEEK = 0x06
DAY_OF_MONTH = 0x07
MONTH = 0x08
YEAR = 0x09
REG_A = 0x0A
REG_B = 0x0B
REG_C = 0x0C
REG_D = 0x0D
CENTURY = 0x32          # IBM PC/AT convention, not part of the MC146818 itself

TIME_REGISTERS = (SECONDS, MINUTES, HOURS, DAY_OF_WEEK, DAY_OF_MONTH, MONTH, YEAR, CENTURY)

NMI_DISABLE = 0x80      # index bit 7 on a PC

# Register A: UIP (bit 7, read-only), DV2-0 (bits 6-4), RS3-0 (bits 3-0).
A_UIP = 0x80
A_DEFAULT = 0x26        # DV = 010: 32.768 kHz time base; RS = 0110: 1024 Hz periodic rate

# Register B.
B_SET = 0x80            # halt updates so the time can be set
B_PIE = 0x40
B_AIE = 0x20
B_UIE = 0x10            # the datasheet clears UIE whenever SET is written as 1
B_SQWE = 0x08
B_DM = 0x04             # data mode: 1 = binary, 0 = BCD
B_24H = 0x02            # 1 = 24-hour mode, 0 = 12-hour with bit 7 of the hour = PM
B_DSE = 0x01
B_DEFAULT = B_24H       # BCD, 24-hour, as PC firmware leaves it

HOUR_PM = 0x80

# Register D: VRT (valid RAM and time), read-only, set while the battery is good.
D_VRT = 0x80

KiB = 1024
MiB = 1024 * KiB

# Seconds since the epoch of 0001-01-01 00:00:00 and 9999-12-31 23:59:59 UTC: the range the
# century/year registers can show. (Plain numbers: importing datetime costs startup time.)
_MIN_T = -62135596800
_MAX_T = 253402300799

_NAMES = {SECONDS: "SECONDS", SECONDS_ALARM: "SECONDS_ALARM", MINUTES: "MINUTES",
          MINUTES_ALARM: "MINUTES_ALARM", HOURS: "HOURS", HOURS_ALARM: "HOURS_ALARM",
          DAY_OF_WEEK: "DAY_OF_WEEK", DAY_OF_MONTH: "DAY_OF_MONTH", MONTH: "MONTH",
          YEAR: "YEAR", REG_A: "REG_A", REG_B: "REG_B", REG_C: "REG_C", REG_D: "REG_D",
          CENTURY: "CENTURY"}


class CmosRtc(BusDevice):
    """The RTC and CMOS RAM; optionally filled with the memory sizes PC firmware reads."""

    name = "cmos"
    window = 2

    def __init__(self, clock: Callable[[], float] = time.time, mem_size: int | None = None,
                 lowmem_end: int = 0xC000_0000):
        """``mem_size``: guest RAM in bytes. RAM above ``lowmem_end`` (where the builder starts
        the 32-bit MMIO hole) is taken to sit above 4 GiB, as in the builder's e820 map; the
        builder must pass the same boundary it uses there."""
        self._clock = clock
        self._lock = threading.Lock()
        self._ram = bytearray(128)
        self._ram[REG_A] = A_DEFAULT
        self._ram[REG_B] = B_DEFAULT
        self._index = 0
        self.nmi_disabled = False
        self._offset = 0.0                      # guest time - clock(), in seconds
        self._latch: dict[int, int] | None = None   # time registers as written while SET
        if mem_size is not None:
            below = min(mem_size, lowmem_end)
            self._set_memory_sizes(below, mem_size - below)

    def _set_memory_sizes(self, below_4g: int, above_4g: int) -> None:
        # The conventional memory-size bytes, computed as QEMU's pc_cmos_init (hw/i386/pc.c) and
        # microvm_set_rtc (hw/i386/microvm.c) do; SeaBIOS and old bootloaders read them.
        ram = self._ram
        base = min(below_4g // KiB, 640)                            # base memory, KiB
        ram[0x15], ram[0x16] = base & 0xFF, base >> 8 & 0xFF
        ext = min((below_4g - 1 * MiB) // KiB if below_4g > 1 * MiB else 0, 65535)
        ram[0x17], ram[0x18] = ext & 0xFF, ext >> 8                 # extended memory, KiB
        ram[0x30], ram[0x31] = ext & 0xFF, ext >> 8                 # the same, POST copy
        high = min((below_4g - 16 * MiB) // (64 * KiB) if below_4g > 16 * MiB else 0, 65535)
        ram[0x34], ram[0x35] = high & 0xFF, high >> 8               # 16 MiB-4 GiB, 64 KiB units
        above = above_4g // (64 * KiB)                              # above 4 GiB, 64 KiB units
        ram[0x5B], ram[0x5C], ram[0x5D] = above & 0xFF, above >> 8 & 0xFF, above >> 16 & 0xFF

    # -- bus interface ---------------------------------------------------------------------

    def read(self, offset: int, size: int) -> int:
        ones = (1 << (8 * max(size, 1))) - 1
        if offset != DATA:
            return ones
        with self._lock:
            value = self._read_register(self._index)
        return value | (ones & ~0xFF)

    def write(self, offset: int, size: int, value: int) -> None:
        value &= 0xFF
        with self._lock:
            if offset == INDEX:
                self._index = value & 0x7F
                self.nmi_disabled = bool(value & NMI_DISABLE)
            elif offset == DATA:
                self._write_register(self._index, value)

    def register_name(self, offset: int, is_write: bool) -> str | None:
        if offset == INDEX:
            return "INDEX"
        if offset == DATA:
            return _NAMES.get(self._index, f"RAM[{self._index:#04x}]")
        return None

    # -- registers (lock held) -------------------------------------------------------------

    def _read_register(self, index: int) -> int:
        if index in TIME_REGISTERS:
            if self._latch is not None:
                return self._latch[index]
            return self._time_registers()[index]
        if index == REG_A:
            return self._ram[REG_A] & ~A_UIP       # no update cycle is ever in progress
        if index == REG_C:
            return 0                                # IRQF/PF/AF/UF: no interrupts here
        if index == REG_D:
            return D_VRT
        return self._ram[index]

    def _write_register(self, index: int, value: int) -> None:
        if index in TIME_REGISTERS:
            if self._latch is not None:
                self._latch[index] = value
            else:
                regs = self._time_registers()
                regs[index] = value
                self._set_time(regs)
        elif index == REG_A:
            self._ram[REG_A] = value & ~A_UIP
        elif index == REG_B:
            self._write_b(value)
        elif index in (REG_C, REG_D):
            pass                                    # read-only
        else:
            self._ram[index] = value

    def _write_b(self, value: int) -> None:
        was_set = self._ram[REG_B] & B_SET
        if value & B_SET:
            value &= ~B_UIE
            if not was_set:
                # Freeze the registers at the current time, so fields the guest does not write
                # keep their values when the new time is committed.
                self._latch = self._time_registers()
        self._ram[REG_B] = value
        if was_set and not value & B_SET and self._latch is not None:
            latch, self._latch = self._latch, None
            self._set_time(latch)

    # -- time (lock held) ------------------------------------------------------------------

    def _encode(self, n: int) -> int:
        if self._ram[REG_B] & B_DM:
            return n & 0xFF
        return (n // 10 % 10) << 4 | n % 10

    def _decode(self, raw: int) -> int:
        if self._ram[REG_B] & B_DM:
            return raw
        # As QEMU's from_bcd: nibbles above 9 are taken at face value rather than refused.
        return (raw >> 4) * 10 + (raw & 0x0F)

    def _time_registers(self) -> dict[int, int]:
        """The time registers as the guest reads them now, in the current data/hour modes."""
        t = min(max(self._clock() + self._offset, _MIN_T), _MAX_T)
        now = time.gmtime(int(t // 1))
        hour = now.tm_hour
        if self._ram[REG_B] & B_24H:
            hours = self._encode(hour)
        else:
            hours = self._encode(hour % 12 or 12) | (HOUR_PM if hour >= 12 else 0)
        return {
            SECONDS: self._encode(now.tm_sec),
            MINUTES: self._encode(now.tm_min),
            HOURS: hours,
            DAY_OF_WEEK: self._encode((now.tm_wday + 1) % 7 + 1),    # tm_wday Monday=0; Sunday = 1
            DAY_OF_MONTH: self._encode(now.tm_mday),
            MONTH: self._encode(now.tm_mon),
            YEAR: self._encode(now.tm_year % 100),
            CENTURY: self._encode(now.tm_year // 100),
        }

    def _set_time(self, regs: dict[int, int]) -> None:
        """Make the guest's clock read ``regs`` now. Out-of-range fields are clamped or carried
        (day 31 of February is 2 or 3 March, as mktime would); nothing here can raise."""
        hour_raw = regs[HOURS]
        if self._ram[REG_B] & B_24H:
            hour = self._decode(hour_raw)
        else:
            hour = self._decode(hour_raw & ~HOUR_PM) % 12 + (12 if hour_raw & HOUR_PM else 0)
        import datetime   # only when the guest sets the clock

        epoch = datetime.datetime(1970, 1, 1)
        year = self._decode(regs[CENTURY]) * 100 + self._decode(regs[YEAR])
        try:
            guest = (datetime.datetime(min(max(year, 1), 9999),
                                       min(max(self._decode(regs[MONTH]), 1), 12), 1)
                     + datetime.timedelta(days=self._decode(regs[DAY_OF_MONTH]) - 1,
                                          hours=hour,
                                          minutes=self._decode(regs[MINUTES]),
                                          seconds=self._decode(regs[SECONDS])))
        except OverflowError:
            return                                  # past year 9999: keep the old time
        self._offset = (guest - epoch).total_seconds() - self._clock()

"""``--net`` specifications -> a network backend + virtio-net device, wired to the device's I/O thread.

    --net user                          libslirp user networking (DHCP 10.0.2.15, gateway
                                        10.0.2.2 = the host, DNS 10.0.2.3), no root needed
    --net user,hostfwd=tcp::8080-:80    ... and host port 8080 forwarded to guest port 80
    --net tap=NAME                      a tap device (created if missing and permitted)
    ...,mac=52:54:00:12:34:56           a fixed MAC (default: random, locally administered)
"""
from __future__ import annotations

import re

from kvmpy.errors import KvmpyError

_HOSTFWD = re.compile(r"^(tcp|udp):([\d.]*):(\d+)-([\d.]*):(\d+)$")


def parse_net(spec: str) -> dict:
    parts = (spec or "").split(",")
    kind, opts = parts[0], parts[1:]
    out: dict = {"hostfwd": [], "mac": None}
    if kind == "user":
        out["kind"] = "user"
    elif kind.startswith("tap="):
        out["kind"], out["tap"] = "tap", kind[4:]
        if not out["tap"]:
            raise KvmpyError(f"--net {spec!r}: name the tap device, e.g. tap=tap0")
    else:
        raise KvmpyError(f"--net {spec!r}: use user[,hostfwd=tcp::HOSTPORT-:GUESTPORT] or "
                         "tap=NAME")
    for o in opts:
        key, _, value = o.partition("=")
        if key == "hostfwd" and out["kind"] == "user":
            m = _HOSTFWD.match(value)
            if not m:
                raise KvmpyError(f"--net {spec!r}: hostfwd must look like tcp::8080-:80")
            proto, haddr, hport, _gaddr, gport = m.groups()
            out["hostfwd"].append((proto, haddr or "127.0.0.1", int(hport), int(gport)))
        elif key == "mac":
            try:
                mac = bytes.fromhex(value.replace(":", ""))
            except ValueError:
                mac = b""
            if len(mac) != 6:
                raise KvmpyError(f"--net {spec!r}: mac must be 6 bytes like 52:54:00:12:34:56")
            out["mac"] = mac
        else:
            raise KvmpyError(f"--net {spec!r}: unknown option {key!r}")
    return out


def make_net(machine, spec: str, io):
    from kvmpy.virtio.net import VirtioNet

    cfg = parse_net(spec)
    if cfg["kind"] == "user":
        from kvmpy.net.slirp import SlirpBackend

        backend = SlirpBackend(hostfwd=cfg["hostfwd"])
        what = "virtio-net user (slirp: 10.0.2.15, gateway 10.0.2.2, DNS 10.0.2.3" + \
            "".join(f", {p} {h}:{hp}->guest:{gp}" for p, h, hp, gp in cfg["hostfwd"]) + ")"
    else:
        from kvmpy.net.tap import TapBackend

        backend = TapBackend(cfg["tap"])
        what = f"virtio-net tap {cfg['tap']}"
    try:
        attach_backend(machine, backend, io)
        return VirtioNet(machine.memory, backend, mac=cfg["mac"]), what
    except BaseException:
        backend.close()
        raise


def attach_backend(machine, backend, io) -> None:
    """Let the device's I/O thread ``io`` serve the backend's fd (an epoll set that includes
    its timers); the fd leaves the I/O thread before the device closes the backend."""
    fds = [fd for fd, _ in backend.fds()]
    for fd, callback in backend.fds():
        io.add_reader(fd, callback)

    def detach():
        for fd in fds:
            try:
                io.remove_reader(fd)
            except Exception:
                pass
    machine._stack.callback(detach)

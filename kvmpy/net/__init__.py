"""Host-side network backends for virtio-net (kvmpy.virtio.net).

* :class:`kvmpy.net.slirp.SlirpBackend`: user-mode networking through libslirp (no root), as
  QEMU's ``-netdev user``.
* :class:`kvmpy.net.tap.TapBackend`: a tap device.

Both follow the interface in :mod:`kvmpy.net.base`: ``send(frame)``, ``set_receiver(fn)``,
``rx_ready()``, ``fds()`` (for the I/O thread's ``add_reader``), ``timeout()`` /
``poll_timers()``, ``close()``. They are imported lazily (libslirp is only loaded when used).
"""

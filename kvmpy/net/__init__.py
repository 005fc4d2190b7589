"""Host-side network backends for virtio-net (kvmpy.virtio.net).

* :class:`kvmpy.net.slirp.SlirpBackend`: user-mode networking through libslirp (no root), as
  QEMU's ``-netdev user``.
* :class:`kvmpy.net.tap.TapBackend`: a tap device.
* :mod:`kvmpy.net.ipfrag`: IPv4 reassembly of the guest's fragments, so that libslirp (which
  crashes on some fragment sequences) only ever sees whole datagrams.

Both follow the interface in :mod:`kvmpy.net.base`: ``send(frame)``, ``set_receiver(fn)``,
``rx_ready()``, ``fds()`` (for the I/O thread's ``add_reader``), ``timeout()`` /
``poll_timers()``, ``close()``. They are imported lazily (libslirp is only loaded when used).
"""

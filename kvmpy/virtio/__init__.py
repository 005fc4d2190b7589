"""Virtio devices, in three layers (STYLE.md item 6):

- ring: :mod:`kvmpy.virtio.queue` validates everything the driver wrote in a split virtqueue and
  hands out descriptor chains;
- device: :mod:`kvmpy.virtio.device` (status, features, queues, the error boundary) and the
  devices on it, :mod:`kvmpy.virtio.blk` and :mod:`kvmpy.virtio.rng`, which parse requests;
- transport: :mod:`kvmpy.virtio.mmio` maps virtio-mmio registers onto a device, with
  :mod:`kvmpy.virtio.iothread` serving ioeventfd notifications and :mod:`kvmpy.virtio.irqfd`
  as an interrupt line.

Devices never touch ring indices; transports never parse requests. Nothing is imported here, so
``import kvmpy`` does not pay for virtio unless a machine has virtio devices.
"""

/* virtio-blk's data path in C: the common requests (IN, OUT, FLUSH) of well-formed split-ring
 * chains, run without the interpreter. Compiled into kvmpy._kvm by kvmpy/_kvm_build.py and
 * driven by kvmpy/virtio/fastblk.py, which explains when and why it is used.
 *
 * The rule that keeps this file small and safe: it does only what it can prove is the ordinary
 * case, and *defers* everything else to the Python device (kvmpy/virtio/queue.py and blk.py),
 * leaving the ring exactly as it found it for that request. Anything a hostile driver can do
 * that is not a plain IN/OUT/FLUSH of a valid chain (a bad index, a loop, a nested indirect
 * table, a buffer outside RAM, a read-only disk, a sector past the end, an unknown type, a
 * missing status byte ...) is therefore judged, reported and answered by the Python code, whose
 * error messages, counters and DEVICE_NEEDS_RESET handling stay the only ones. This file must
 * still never touch memory outside guest RAM, loop without bound, or trust a value it read twice.
 *
 * Layers, as in Python: the ring (pop a head, walk its chain, add a used element; virtio 1.2
 * 2.7), then the block device (parse the request, do the I/O; 5.2.6). No transport here.
 */
#include <errno.h>
#include <stdint.h>
#include <string.h>
#include <sys/uio.h>
#include <time.h>
#include <unistd.h>

struct kvmpy_region {       /* one GuestMemory region: guest-physical start, size, host address */
    uint64_t gpa;
    uint64_t size;
    uint64_t hva;
};

struct kvmpy_vq {           /* one split virtqueue (mirrors kvmpy.virtio.queue.Queue) */
    uint64_t desc, avail, used;     /* host addresses of the three parts: Queue.activate()
                                       checked each lies wholly in guest RAM */
    uint32_t size;                  /* a power of two, 1..32768 (checked by activate) */
    uint8_t event_idx;              /* VIRTIO_F_EVENT_IDX negotiated (2.7.10) */
    uint8_t indirect;               /* VIRTIO_F_INDIRECT_DESC negotiated (2.7.5.3) */
    uint16_t last_avail;            /* next avail entry to take (free-running) */
    uint16_t avail_seen;            /* avail.idx as last read */
    uint16_t used_idx;              /* used.idx the device publishes (free-running) */
    uint8_t *in_flight;             /* size bytes, 1 where a head is in flight */
};

struct kvmpy_blk {          /* one virtio-blk device (mirrors kvmpy.virtio.blk.VirtioBlk) */
    int fd;                         /* the image, open O_RDWR (or O_RDONLY when ro) */
    int ro;                         /* read-only: OUT is deferred (Python answers IOERR) */
    int sync_writes;                /* FLUSH not negotiated: each write is made stable (5.2.6.2) */
    int iov_max;                    /* at most this many data segments (else deferred) */
    uint64_t capacity;              /* in 512-byte sectors */
    uint64_t reads, writes, flushes, ioerr;   /* counters, added to by each call */
    uint32_t test_max_io;           /* tests only: at most this many bytes per system call */
    int test_errno;                 /* tests only: every system call fails with this errno */
    uint32_t test_syncs;            /* tests only: fdatasync calls made ... */
    uint16_t test_used_at_sync[16]; /* ... and used.idx in guest RAM at each (the first 16) */
    struct iovec *rd, *wr;          /* scratch: iov_max + 2 entries each */
};

/* kvmpy_blk_run's *why: why it returned */
#define KVMPY_RUN_EMPTY 0           /* no request is waiting */
#define KVMPY_RUN_DEFER 1           /* the next request is for the Python device (not taken) */
#define KVMPY_RUN_BUDGET 2          /* the budget ran out */

/* virtq_desc.flags (2.7.5) */
#define F_NEXT 1
#define F_WRITE 2
#define F_INDIRECT 4
#define MAX_INDIRECT_ENTRIES 65535  /* an indirect table is indexed by the 16-bit `next` */

/* virtio_blk_req (5.2.6) */
#define SECTOR_SIZE 512
#define HEADER_SIZE 16              /* le32 type; le32 reserved; le64 sector */
#define T_IN 0
#define T_OUT 1
#define T_FLUSH 4
#define S_OK 0
#define S_IOERR 1

/* Guest memory is shared with running vCPUs: every load of a ring field or descriptor goes
 * through a volatile access, so it happens exactly once and its value is the one used (the
 * compiler may not re-read it). x86 is little-endian, as virtio 1.x rings are. */
/* The guest chooses the alignment of indirect tables and request headers: the types say
 * "aligned to 1" so that the accesses are defined C wherever they land (x86 loads them fine). */
typedef uint16_t u16_any __attribute__((aligned(1), may_alias));
typedef uint32_t u32_any __attribute__((aligned(1), may_alias));
typedef uint64_t u64_any __attribute__((aligned(1), may_alias));
static inline uint16_t ld16(uint64_t a) { return *(volatile u16_any *)(uintptr_t)a; }
static inline uint32_t ld32(uint64_t a) { return *(volatile u32_any *)(uintptr_t)a; }
static inline uint64_t ld64(uint64_t a) { return *(volatile u64_any *)(uintptr_t)a; }
static inline void st8(uint64_t a, uint8_t v) { *(volatile uint8_t *)(uintptr_t)a = v; }
static inline void st16(uint64_t a, uint16_t v) { *(volatile u16_any *)(uintptr_t)a = v; }
static inline void st32(uint64_t a, uint32_t v) { *(volatile u32_any *)(uintptr_t)a = v; }

/* GuestMemory.check's test: the host address of [gpa, gpa+len) if one region holds all of it. */
static int locate(const struct kvmpy_region *r, int n, int *hint, uint64_t gpa, uint64_t len,
                  uint64_t *hva)
{
    for (int k = 0; k < n; k++) {
        int i = (*hint + k) % n;
        if (gpa < r[i].gpa)
            continue;
        uint64_t off = gpa - r[i].gpa;
        if (off <= r[i].size && len <= r[i].size - off && (off < r[i].size || len == 0)) {
            *hint = i;
            *hva = r[i].hva + off;
            return 1;
        }
    }
    return 0;
}

/* -- the ring (2.7) ----------------------------------------------------------------------------*/

/* avail.idx, or -1 when it runs more than `size` entries ahead (Queue._read_avail_idx). */
static int read_avail_idx(struct kvmpy_vq *q)
{
    uint16_t idx = ld16(q->avail + 2);
    if ((uint16_t)(idx - q->last_avail) > q->size)
        return -1;
    q->avail_seen = idx;
    return idx;
}

/* The next available head (1), none (0), or -1 to defer (Queue.pop's checks). */
static int peek_head(struct kvmpy_vq *q, uint16_t *head)
{
    uint16_t last = q->last_avail;
    if (q->avail_seen == last) {
        int idx = read_avail_idx(q);
        if (idx < 0)
            return -1;
        if (idx == last) {
            if (!q->event_idx)
                return 0;
            /* 2.7.10: avail_event, then look again (a full barrier between the store and the
               load, as Queue.pop's full_barrier()) */
            st16(q->used + 4 + 8 * (uint64_t)q->size, last);
            __atomic_thread_fence(__ATOMIC_SEQ_CST);
            idx = read_avail_idx(q);
            if (idx < 0)
                return -1;
            if (idx == last)
                return 0;
        }
    }
    uint16_t h = ld16(q->avail + 4 + 2 * (uint64_t)(last % q->size));
    if (h >= q->size || q->in_flight[h])
        return -1;
    *head = h;
    return 1;
}

struct chain {
    struct iovec *rd, *wr;          /* non-empty buffers, device-readable then device-writable */
    int nrd, nwr, max;
    uint64_t read_len, write_len;
};

/* Count a buffer of `len` bytes at `hva` into one direction of a chain; a non-empty one takes
 * an iovec entry. 0 when the entries are used up (the chain is deferred). */
static int add_buffer(struct iovec *v, int *n, int max, uint64_t *total, uint64_t hva,
                      uint32_t len)
{
    *total += len;
    if (!len)
        return 1;
    if (*n == max)
        return 0;
    v[*n].iov_base = (void *)(uintptr_t)hva;
    v[*n].iov_len = len;
    (*n)++;
    return 1;
}

/* Walk the chain from `head` with Queue._walk's rules; 0 (defer) on any rule broken, or when
 * the chain has more than c->max non-empty buffers in one direction. */
static int walk(const struct kvmpy_vq *q, const struct kvmpy_region *regions, int nregions,
                int *hint, uint16_t head, struct chain *c)
{
    uint64_t table = q->desc;
    uint32_t table_len = q->size, ttl = q->size, index = head;
    int in_indirect = 0;
    c->nrd = c->nwr = 0;
    c->read_len = c->write_len = 0;
    for (;;) {
        if (index >= table_len || ttl == 0)     /* out of the table, or a loop (2.7.5.2) */
            return 0;
        ttl--;
        uint64_t d = table + 16 * (uint64_t)index;     /* struct virtq_desc, read once */
        uint64_t addr = ld64(d);
        uint32_t len = ld32(d + 8);
        uint16_t flags = ld16(d + 12), next = ld16(d + 14);
        uint64_t hva;
        if (flags & F_INDIRECT) {                       /* 2.7.5.3.1 */
            if (!q->indirect || in_indirect || (flags & F_NEXT) || len == 0 || len % 16 ||
                len / 16 > MAX_INDIRECT_ENTRIES)
                return 0;
            if (!locate(regions, nregions, hint, addr, len, &hva))
                return 0;
            table = hva;
            table_len = ttl = len / 16;
            index = 0;
            in_indirect = 1;
            continue;
        }
        if (!locate(regions, nregions, hint, addr, len, &hva))
            return 0;
        if (flags & F_WRITE) {
            if (!add_buffer(c->wr, &c->nwr, c->max, &c->write_len, hva, len))
                return 0;
        } else {
            if (c->nwr)                 /* readable after writable (2.7.4.2) */
                return 0;
            if (!add_buffer(c->rd, &c->nrd, c->max, &c->read_len, hva, len))
                return 0;
        }
        if (!(flags & F_NEXT))
            break;
        index = next;
    }
    /* at most 32768 + 65535 lengths below 2^32 each: no overflow in 64 bits */
    return c->read_len + c->write_len < ((uint64_t)1 << 32);
}

static void add_used(struct kvmpy_vq *q, uint16_t head, uint32_t written)
{
    uint64_t e = q->used + 4 + 8 * (uint64_t)(q->used_idx % q->size);  /* virtq_used_elem */
    st32(e, head);
    st32(e + 4, written);
    q->used_idx++;
}

/* -- the block device (5.2.6) ----------------------------------------------------------------*/

/* Drop the first `n` bytes of iov[0..cnt), in place: *iovp moves past the entries used up and a
 * partly used one is shortened. Returns the entries left. */
static int iov_skip(struct iovec **iovp, int cnt, uint64_t n)
{
    struct iovec *iov = *iovp;
    while (cnt > 0 && n >= iov[0].iov_len) {
        n -= iov[0].iov_len;
        iov++;
        cnt--;
    }
    if (cnt > 0 && n) {
        iov[0].iov_base = (char *)iov[0].iov_base + n;
        iov[0].iov_len -= n;
    }
    *iovp = iov;
    return cnt;
}

/* Transfer all of iov[0..cnt) at file offset pos, resuming short transfers. 0, or -1 (errno). */
static int transfer(struct kvmpy_blk *b, int write, struct iovec *iov, int cnt, uint64_t pos)
{
    while (cnt > 0) {
        struct iovec one;
        struct iovec *v = iov;
        int vc = cnt;
        if (b->test_errno) {
            errno = b->test_errno;
            return -1;
        }
        if (b->test_max_io) {
            one.iov_base = iov[0].iov_base;
            one.iov_len = iov[0].iov_len < b->test_max_io ? iov[0].iov_len : b->test_max_io;
            v = &one;
            vc = 1;
        }
        ssize_t n = write ? pwritev(b->fd, v, vc, (off_t)pos) : preadv(b->fd, v, vc, (off_t)pos);
        if (n < 0) {
            if (errno == EINTR)
                continue;
            return -1;
        }
        if (n == 0) {                   /* end of file: the image shrank under us */
            errno = EIO;
            return -1;
        }
        pos += (uint64_t)n;
        cnt = iov_skip(&iov, cnt, (uint64_t)n);
    }
    return 0;
}

static int sync_file(struct kvmpy_blk *b, const struct kvmpy_vq *q)
{
    if (b->test_syncs < 16)
        b->test_used_at_sync[b->test_syncs] = ld16(q->used + 2);
    b->test_syncs++;
    if (b->test_errno) {
        errno = b->test_errno;
        return -1;
    }
    return fdatasync(b->fd);
}

/* The data segments: `iov` minus its first `skip` bytes and its last `trim` bytes, in place.
 * Returns their count. */
static int data_segments(struct iovec *iov, int n, uint64_t skip, uint64_t trim, struct iovec **out)
{
    n = iov_skip(&iov, n, skip);
    while (n > 0 && trim >= iov[n - 1].iov_len) {
        trim -= iov[n - 1].iov_len;
        n--;
    }
    if (n > 0 && trim)
        iov[n - 1].iov_len -= trim;
    *out = iov;
    return n;
}

static uint64_t now_ns(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (uint64_t)t.tv_sec * 1000000000u + (uint64_t)t.tv_nsec;
}

/* Busy-wait up to `ns` for avail.idx to move past what the device consumed (1 if it did).
 * Called after the completions were signalled, before the I/O thread goes back to sleep;
 * QEMU's IOThread does the same (poll-max-ns): a driver that posts again within the window
 * is served without a sleep and a wakeup, which cost tens of microseconds on a loaded or
 * virtualised host. */
int kvmpy_vq_poll(const struct kvmpy_vq *q, uint32_t ns)
{
    uint64_t end = now_ns() + ns;
    for (;;) {
        for (int i = 0; i < 64; i++) {
            if (ld16(q->avail + 2) != q->last_avail)
                return 1;
            __builtin_ia32_pause();
        }
        if (now_ns() >= end)
            return 0;
    }
}

static int range_ok(const struct kvmpy_blk *b, uint64_t sector, uint64_t bytes)
{
    return bytes % SECTOR_SIZE == 0 && sector <= b->capacity &&
           bytes / SECTOR_SIZE <= b->capacity - sector;
}

/* Run requests of one queue until it is empty, a request needs the Python device, or `budget`
 * requests are done. Returns the number done; *why says which (KVMPY_RUN_*). used.idx is
 * published before returning when anything was done. */
int kvmpy_blk_run(struct kvmpy_vq *q, const struct kvmpy_region *regions, int nregions,
                  struct kvmpy_blk *b, int budget, int *why)
{
    int done = 0, hint = 0;
    struct chain c = { b->rd, b->wr, 0, 0, b->iov_max + 2, 0, 0 };
    *why = KVMPY_RUN_BUDGET;
    while (done < budget) {
        uint16_t head;
        int got = peek_head(q, &head);
        if (got <= 0) {
            *why = got == 0 ? KVMPY_RUN_EMPTY : KVMPY_RUN_DEFER;
            break;
        }
        if (!walk(q, regions, nregions, &hint, head, &c) || c.nwr == 0 ||
            c.read_len < HEADER_SIZE || c.rd[0].iov_len < HEADER_SIZE) {
            *why = KVMPY_RUN_DEFER;     /* broken chain, no status byte, split or short header */
            break;
        }
        uint64_t h = (uint64_t)(uintptr_t)c.rd[0].iov_base;
        uint32_t type = ld32(h);
        uint64_t sector = ld64(h + 8);
        uint64_t data_in = c.write_len - 1;              /* writable bytes before the status */
        uint64_t data_out = c.read_len - HEADER_SIZE;    /* readable bytes after the header */
        uint64_t status_at = (uint64_t)(uintptr_t)c.wr[c.nwr - 1].iov_base +
                             c.wr[c.nwr - 1].iov_len - 1;
        struct iovec *data;
        int n;
        uint8_t status = S_OK;
        uint32_t written = 0;
        if (type == T_IN || type == T_OUT) {
            int write = type == T_OUT;
            if ((write && b->ro) || !range_ok(b, sector, write ? data_out : data_in))
                goto defer;                              /* IOERR, said by Python */
            /* the data: writable bytes before the status, or readable ones after the header */
            n = write ? data_segments(c.rd, c.nrd, HEADER_SIZE, 0, &data)
                      : data_segments(c.wr, c.nwr, 0, 1, &data);
            if (n > b->iov_max)
                goto defer;
            if (transfer(b, write, data, n, sector * SECTOR_SIZE) < 0) {
                status = S_IOERR;
            } else if (!write) {
                b->reads++;
                written = (uint32_t)data_in;
            } else {
                b->writes++;
                if (b->sync_writes && sync_file(b, q) < 0)
                    status = S_IOERR;
            }
        } else if (type == T_FLUSH) {
            if (!b->ro && sync_file(b, q) < 0)              /* before the used element */
                status = S_IOERR;
            else
                b->flushes++;
        } else {
            goto defer;                                  /* GET_ID, DISCARD, ... : Python */
        }
        if (status != S_OK)
            b->ioerr++;
        st8(status_at, status);
        q->last_avail++;
        add_used(q, head, written + 1);
        done++;
        continue;
defer:
        *why = KVMPY_RUN_DEFER;
        break;
    }
    if (done) {
        /* 2.7.8.1: the used elements before the index that publishes them (x86 keeps stores in
           order; this stops the compiler from moving them) */
        __atomic_signal_fence(__ATOMIC_SEQ_CST);
        st16(q->used + 2, q->used_idx);
    }
    return done;
}

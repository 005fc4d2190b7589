/*
 * baseline: the exit-cost guest run by the smallest possible KVM VMM in C, for comparison with
 * kvmpy (bench_exit_cost.py runs both on the same binary).
 *
 * Same VM as kvmpy's Machine(mem) + setup_vcpu(REAL, 0x7c00): KVM_SET_TSS_ADDR 0xfffbd000,
 * KVM_SET_IDENTITY_MAP_ADDR 0xfffbc000, one anonymous memory slot [0, mem) (MAP_NORESERVE),
 * KVM_SET_CPUID2 with KVM_GET_SUPPORTED_CPUID, real mode with all segments 0 (limit 0xffff),
 * IP=0x7c00, SP=0x7c00, RFLAGS=2. The KVM_RUN loop does no work per exit beyond a switch on the
 * port. Time is taken from the exit at port 0xe1 (mark) to the exit at port 0xf4 (end).
 *
 * usage: baseline IMAGE MEM_MIB EXPECTED_EXITS
 * prints: exits=N mark_to_end_ns=T total_ns=T2   (total: from KVM_CREATE_VM to the end exit)
 * exit status 0 on success, 1 on any error or if the count of port-0xe0 exits is wrong.
 */
#include <errno.h>
#include <fcntl.h>
#include <linux/kvm.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define LOAD_ADDR 0x7c00
#define TSS_ADDRESS 0xfffbd000UL           /* kvmpy/builder.py, after Firecracker */
#define IDENTITY_MAP_ADDRESS 0xfffbc000ULL

static void die(const char *what)
{
    fprintf(stderr, "baseline: %s: %s\n", what, strerror(errno));
    exit(1);
}

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc != 4) {
        fprintf(stderr, "usage: %s IMAGE MEM_MIB EXPECTED_EXITS\n", argv[0]);
        return 1;
    }
    size_t mem_size = strtoull(argv[2], NULL, 0) << 20;
    uint64_t expected = strtoull(argv[3], NULL, 0);

    uint64_t t_start = now_ns();
    int kvm = open("/dev/kvm", O_RDWR | O_CLOEXEC);
    if (kvm < 0)
        die("open /dev/kvm");
    int vm = ioctl(kvm, KVM_CREATE_VM, 0);
    if (vm < 0)
        die("KVM_CREATE_VM");
    if (ioctl(vm, KVM_SET_TSS_ADDR, TSS_ADDRESS) < 0)
        die("KVM_SET_TSS_ADDR");
    uint64_t ident = IDENTITY_MAP_ADDRESS;
    if (ioctl(vm, KVM_SET_IDENTITY_MAP_ADDR, &ident) < 0)
        die("KVM_SET_IDENTITY_MAP_ADDR");

    void *mem = mmap(NULL, mem_size, PROT_READ | PROT_WRITE,
                     MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (mem == MAP_FAILED)
        die("mmap guest memory");
    struct kvm_userspace_memory_region region = {
        .slot = 0, .guest_phys_addr = 0, .memory_size = mem_size, .userspace_addr = (uintptr_t)mem,
    };
    if (ioctl(vm, KVM_SET_USER_MEMORY_REGION, &region) < 0)
        die("KVM_SET_USER_MEMORY_REGION");

    FILE *f = fopen(argv[1], "rb");
    if (!f)
        die(argv[1]);
    size_t n = fread((char *)mem + LOAD_ADDR, 1, mem_size - LOAD_ADDR, f);
    fclose(f);
    if (n == 0) {
        fprintf(stderr, "baseline: %s is empty\n", argv[1]);
        return 1;
    }

    int vcpu = ioctl(vm, KVM_CREATE_VCPU, 0);
    if (vcpu < 0)
        die("KVM_CREATE_VCPU");
    int run_size = ioctl(kvm, KVM_GET_VCPU_MMAP_SIZE, 0);
    if (run_size < 0)
        die("KVM_GET_VCPU_MMAP_SIZE");
    struct kvm_run *run = mmap(NULL, run_size, PROT_READ | PROT_WRITE, MAP_SHARED, vcpu, 0);
    if (run == MAP_FAILED)
        die("mmap kvm_run");

    int nent = 256;
    struct kvm_cpuid2 *cpuid = calloc(1, sizeof(*cpuid) + nent * sizeof(struct kvm_cpuid_entry2));
    cpuid->nent = nent;
    if (ioctl(kvm, KVM_GET_SUPPORTED_CPUID, cpuid) < 0)
        die("KVM_GET_SUPPORTED_CPUID");
    if (ioctl(vcpu, KVM_SET_CPUID2, cpuid) < 0)
        die("KVM_SET_CPUID2");

    struct kvm_sregs sregs;
    if (ioctl(vcpu, KVM_GET_SREGS, &sregs) < 0)
        die("KVM_GET_SREGS");
    struct kvm_segment *segs[] = {&sregs.cs, &sregs.ds, &sregs.es, &sregs.fs, &sregs.gs, &sregs.ss};
    for (unsigned i = 0; i < sizeof segs / sizeof segs[0]; i++) {
        segs[i]->selector = 0;
        segs[i]->base = 0;
        segs[i]->limit = 0xffff;
    }
    if (ioctl(vcpu, KVM_SET_SREGS, &sregs) < 0)
        die("KVM_SET_SREGS");
    struct kvm_regs regs;
    if (ioctl(vcpu, KVM_GET_REGS, &regs) < 0)
        die("KVM_GET_REGS");
    regs.rip = LOAD_ADDR;
    regs.rflags = 2;
    regs.rsp = 0x7c00;
    if (ioctl(vcpu, KVM_SET_REGS, &regs) < 0)
        die("KVM_SET_REGS");

    uint64_t t_mark = 0, t_end = 0, exits = 0;
    for (;;) {
        if (ioctl(vcpu, KVM_RUN, 0) < 0) {
            if (errno == EINTR || errno == EAGAIN)
                continue;
            die("KVM_RUN");
        }
        if (run->exit_reason == KVM_EXIT_IO) {
            uint16_t port = run->io.port;
            if (port == 0xe0) {
                exits++;
                continue;
            }
            if (port == 0xe1) {
                t_mark = now_ns();
                continue;
            }
            if (port == 0xf4) {
                t_end = now_ns();
                break;
            }
            fprintf(stderr, "baseline: unexpected I/O to port %#x\n", port);
            return 1;
        }
        if (run->exit_reason == KVM_EXIT_HLT) {
            t_end = now_ns();
            break;
        }
        fprintf(stderr, "baseline: unexpected exit reason %u\n", run->exit_reason);
        return 1;
    }
    if (exits != expected || t_mark == 0) {
        fprintf(stderr, "baseline: %llu exits to port 0xe0, expected %llu (mark %s)\n",
                (unsigned long long)exits, (unsigned long long)expected, t_mark ? "seen" : "missing");
        return 1;
    }
    printf("exits=%llu mark_to_end_ns=%llu total_ns=%llu\n", (unsigned long long)exits,
           (unsigned long long)(t_end - t_mark), (unsigned long long)(t_end - t_start));
    return 0;
}

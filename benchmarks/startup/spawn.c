/*
 * spawn: run a command once and print its wall time, peak RSS and exit status.
 *
 *   usage: spawn COMMAND [ARG...]     prints: wall_ns=N maxrss_kib=N status=N
 *
 * The child's stdin, stdout and stderr are /dev/null. Wall time is clock_gettime(MONOTONIC)
 * from just before fork() to wait4() returning; peak RSS is wait4()'s ru_maxrss of the child.
 *
 * Why a C helper and not os.wait4 in the benchmark itself: Linux keeps the larger of the
 * pre-exec and post-exec high-water RSS in ru_maxrss (fs/exec.c, exec_mmap ->
 * setmax_mm_hiwater_rss), and a child forked or vforked from a Python process starts with that
 * process's RSS (~15 MiB), which would hide the real peak of any small program. Forked from this
 * small program, the inherited floor is about 1 MiB.
 */
#define _GNU_SOURCE
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/resource.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

static uint64_t now_ns(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (uint64_t)ts.tv_sec * 1000000000ULL + ts.tv_nsec;
}

int main(int argc, char **argv)
{
    if (argc < 2) {
        fprintf(stderr, "usage: %s COMMAND [ARG...]\n", argv[0]);
        return 2;
    }
    uint64_t t0 = now_ns();
    pid_t pid = fork();
    if (pid < 0) {
        perror("spawn: fork");
        return 2;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (null < 0)
            _exit(126);
        dup2(null, 0);
        dup2(null, 1);
        dup2(null, 2);
        execv(argv[1], argv + 1);
        _exit(127);
    }
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) {
        perror("spawn: wait4");
        return 2;
    }
    uint64_t t1 = now_ns();
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("wall_ns=%llu maxrss_kib=%ld status=%d\n", (unsigned long long)(t1 - t0),
           ru.ru_maxrss, code);
    return 0;
}

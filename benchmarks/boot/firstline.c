/*
 * firstline: run a command once; print its time to the first line on stdout, its wall time,
 * peak RSS and exit status, and that first line.
 *
 *   usage: firstline COMMAND [ARG...]
 *   prints: first_line_ns=N wall_ns=N maxrss_kib=N status=N bytes=N line=TEXT
 *
 * The child's stdin and stderr are /dev/null, its stdout is a pipe read here. All times are
 * clock_gettime(MONOTONIC) from just before fork(): first_line_ns when a read() returns the
 * first '\n' (-1 if there is none), wall_ns when wait4() returns, after the pipe has reached
 * EOF (the child has exited, or closed its stdout). ru_maxrss of wait4 is the child's peak RSS.
 * TEXT is the first line without its '\n' (at most 255 bytes, non-printable bytes as '?');
 * bytes is everything the child wrote to stdout.
 *
 * A C helper and not os.fork/os.wait4 in the benchmark itself for the reason given in
 * ../startup/spawn.c: a child forked from a Python process inherits its ~15 MiB high-water RSS
 * into ru_maxrss. Forked from this small program, the inherited floor is about 1 MiB.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
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
    int p[2];
    if (pipe2(p, O_CLOEXEC) < 0) {
        perror("firstline: pipe");
        return 2;
    }
    uint64_t t0 = now_ns();
    pid_t pid = fork();
    if (pid < 0) {
        perror("firstline: fork");
        return 2;
    }
    if (pid == 0) {
        int null = open("/dev/null", O_RDWR);
        if (null < 0)
            _exit(126);
        dup2(null, 0);
        dup2(p[1], 1);          /* dup2 clears O_CLOEXEC on fd 1 */
        dup2(null, 2);
        execv(argv[1], argv + 1);
        _exit(127);
    }
    close(p[1]);
    char buf[4096], line[256];
    size_t line_len = 0, total = 0;
    int have_line = 0;
    uint64_t t_line = 0;
    for (;;) {
        ssize_t n = read(p[0], buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n <= 0)
            break;
        total += (size_t)n;
        for (ssize_t i = 0; i < n && !have_line; i++) {
            if (buf[i] == '\n') {
                t_line = now_ns();
                have_line = 1;
            } else if (line_len < sizeof line - 1) {
                unsigned char c = (unsigned char)buf[i];
                line[line_len++] = (c >= 0x20 && c < 0x7f) ? (char)c : '?';
            }
        }
    }
    close(p[0]);
    int status;
    struct rusage ru;
    if (wait4(pid, &status, 0, &ru) < 0) {
        perror("firstline: wait4");
        return 2;
    }
    uint64_t t1 = now_ns();
    line[line_len] = '\0';
    int code = WIFEXITED(status) ? WEXITSTATUS(status) : 128 + WTERMSIG(status);
    printf("first_line_ns=%lld wall_ns=%llu maxrss_kib=%ld status=%d bytes=%zu line=%s\n",
           have_line ? (long long)(t_line - t0) : -1LL, (unsigned long long)(t1 - t0),
           ru.ru_maxrss, code, total, line);
    return 0;
}

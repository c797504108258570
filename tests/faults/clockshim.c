/* LD_PRELOAD shim: add an offset to the wall clock of one process.
 *
 * The offset (signed 64-bit nanoseconds, native byte order) is read from the file
 * named by LEASEHOLD_CLOCK_OFFSET_FILE, mapped into memory once, so a test steps the
 * clock by rewriting those 8 bytes and every later call sees it. Only wall-clock
 * reads move (CLOCK_REALTIME*, gettimeofday, time); CLOCK_MONOTONIC is left alone,
 * as on a host whose NTP steps the clock. libfaketime aborts redis-server 7; this
 * does the one thing the tests need. Built by tests/faults/clockshim.py at test time.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <fcntl.h>
#include <stdint.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <sys/time.h>
#include <time.h>
#include <unistd.h>

static volatile int64_t *offset_ns;
static int (*real_clock_gettime)(clockid_t, struct timespec *);

static void shim_init(void) {
    if (real_clock_gettime == NULL)
        real_clock_gettime = (int (*)(clockid_t, struct timespec *))dlsym(RTLD_NEXT, "clock_gettime");
    if (offset_ns == NULL) {
        const char *path = getenv("LEASEHOLD_CLOCK_OFFSET_FILE");
        if (path != NULL) {
            int fd = open(path, O_RDONLY);
            if (fd >= 0) {
                void *map = mmap(NULL, sizeof(int64_t), PROT_READ, MAP_SHARED, fd, 0);
                if (map != MAP_FAILED)
                    offset_ns = (volatile int64_t *)map;
                close(fd);
            }
        }
    }
}

__attribute__((constructor)) static void shim_constructor(void) { shim_init(); }

static int64_t shim_offset(void) { return offset_ns == NULL ? 0 : *offset_ns; }

static void shift(struct timespec *ts) {
    int64_t ns = (int64_t)ts->tv_sec * 1000000000LL + ts->tv_nsec + shim_offset();
    ts->tv_sec = (time_t)(ns / 1000000000LL);
    ts->tv_nsec = (long)(ns % 1000000000LL);
    if (ts->tv_nsec < 0) {
        ts->tv_nsec += 1000000000L;
        ts->tv_sec -= 1;
    }
}

int clock_gettime(clockid_t id, struct timespec *ts) {
    if (real_clock_gettime == NULL)
        shim_init();
    int rc = real_clock_gettime(id, ts);
    if (rc == 0 && (id == CLOCK_REALTIME || id == CLOCK_REALTIME_COARSE))
        shift(ts);
    return rc;
}

int gettimeofday(struct timeval *restrict tv, void *restrict tz) {
    (void)tz;
    struct timespec ts;
    int rc = clock_gettime(CLOCK_REALTIME, &ts);
    if (rc == 0) {
        tv->tv_sec = ts.tv_sec;
        tv->tv_usec = ts.tv_nsec / 1000;
    }
    return rc;
}

time_t time(time_t *out) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    if (out != NULL)
        *out = ts.tv_sec;
    return ts.tv_sec;
}

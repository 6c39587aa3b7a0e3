/*
 * faultio: an LD_PRELOAD interposer that makes a process's file writes or flushes fail while a
 * trigger file exists. Test-only fault injection for nbd-downstairs (the product has no switch for
 * it): the incident scripts, chaos.sh and the downstairs tests preload it into a real process.
 *
 *   FAULTIO_WRITES_WHEN=FILE   pwrite/pwrite64/pwritev/pwritev64 fail while FILE exists
 *   FAULTIO_FLUSHES_WHEN=FILE  fsync/fdatasync fail while FILE exists
 *   FAULTIO_PATHS=TEXT         only on files whose path contains TEXT (default "/extents/": extent
 *                              and repair staging files, not region.meta)
 *   FAULTIO_LOG=FILE           one line appended per injected failure (so a script can tell the
 *                              injected errors from real ones)
 *
 * The errno is named in the trigger file: ENOSPC, EDQUOT, anything else (or empty) EIO.
 * Build: gcc -shared -fPIC -O2 -o faultio.so faultio.c -ldl
 * nbd-downstairs resolves its own fsync through the global symbol scope (Program.cs), so the
 * runtime's pwrite and our fdatasync are both seen here.
 */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <errno.h>
#include <fcntl.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/types.h>
#include <sys/uio.h>
#include <unistd.h>

static int injected_errno(const char *trigger_env, int fd, const char *op)
{
    const char *trigger = getenv(trigger_env);
    if (trigger == NULL || access(trigger, F_OK) != 0) {
        return 0;
    }
    const char *only = getenv("FAULTIO_PATHS");
    if (only == NULL) {
        only = "/extents/";
    }
    char link[64], path[4096];
    snprintf(link, sizeof link, "/proc/self/fd/%d", fd);
    ssize_t n = readlink(link, path, sizeof path - 1);
    if (n < 0) {
        return 0;
    }
    path[n] = '\0';
    if (strstr(path, only) == NULL) {
        return 0;
    }
    char name[32] = {0};
    int t = open(trigger, O_RDONLY | O_CLOEXEC);
    if (t >= 0) {
        ssize_t r = read(t, name, sizeof name - 1);
        (void)r;
        close(t);
    }
    int err = strncmp(name, "ENOSPC", 6) == 0 ? ENOSPC : strncmp(name, "EDQUOT", 6) == 0 ? EDQUOT : EIO;
    const char *log = getenv("FAULTIO_LOG");
    if (log != NULL) {
        int l = open(log, O_WRONLY | O_APPEND | O_CREAT | O_CLOEXEC, 0644);
        if (l >= 0) {
            char line[4200];
            int len = snprintf(line, sizeof line, "faultio: injected %s on %s %s\n", strerrorname_np(err), op, path);
            ssize_t w = write(l, line, len > 0 && len < (int)sizeof line ? (size_t)len : 0);
            (void)w;
            close(l);
        }
    }
    return err;
}

#define NEXT(name, type) ((type)dlsym(RTLD_NEXT, name))
#define FAIL_IF(env, fd, op) do { int e_ = injected_errno(env, fd, op); if (e_ != 0) { errno = e_; return -1; } } while (0)

ssize_t pwrite(int fd, const void *buf, size_t count, off_t offset)
{
    FAIL_IF("FAULTIO_WRITES_WHEN", fd, "pwrite");
    return NEXT("pwrite", ssize_t (*)(int, const void *, size_t, off_t))(fd, buf, count, offset);
}

ssize_t pwrite64(int fd, const void *buf, size_t count, off_t offset)
{
    FAIL_IF("FAULTIO_WRITES_WHEN", fd, "pwrite");
    return NEXT("pwrite64", ssize_t (*)(int, const void *, size_t, off_t))(fd, buf, count, offset);
}

ssize_t pwritev(int fd, const struct iovec *iov, int iovcnt, off_t offset)
{
    FAIL_IF("FAULTIO_WRITES_WHEN", fd, "pwritev");
    return NEXT("pwritev", ssize_t (*)(int, const struct iovec *, int, off_t))(fd, iov, iovcnt, offset);
}

ssize_t pwritev64(int fd, const struct iovec *iov, int iovcnt, off_t offset)
{
    FAIL_IF("FAULTIO_WRITES_WHEN", fd, "pwritev");
    return NEXT("pwritev64", ssize_t (*)(int, const struct iovec *, int, off_t))(fd, iov, iovcnt, offset);
}

int fsync(int fd)
{
    FAIL_IF("FAULTIO_FLUSHES_WHEN", fd, "fsync");
    return NEXT("fsync", int (*)(int))(fd);
}

int fdatasync(int fd)
{
    FAIL_IF("FAULTIO_FLUSHES_WHEN", fd, "fdatasync");
    return NEXT("fdatasync", int (*)(int))(fd);
}

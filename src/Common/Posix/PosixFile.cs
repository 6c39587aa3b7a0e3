using System.ComponentModel;
using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;

namespace NbdServer.Common.Posix;

/// <summary>
/// An IO error that carries the errno the kernel reported, so callers can map it
/// (ENOSPC, EDQUOT, EIO…) to a protocol error instead of guessing from a message.
/// </summary>
public sealed class PosixIOException(int errno, string operation, string? path = null)
    : IOException(Format(errno, operation, path))
{
    public int Errno { get; } = errno;

    public bool IsNoSpace => Errno is Errnos.ENOSPC or Errnos.EDQUOT or Errnos.EFBIG;

    private static string Format(int errno, string operation, string? path) =>
        $"{operation}{(path is null ? "" : $" '{path}'")} failed: {Errnos.Name(errno)} ({new Win32Exception(errno).Message})";
}

/// <summary>Linux errno values we act on.</summary>
public static class Errnos
{
    public const int EPERM = 1;
    public const int EINTR = 4;
    public const int EIO = 5;
    public const int EBADF = 9;
    public const int ENOMEM = 12;
    public const int EINVAL = 22;
    public const int EFBIG = 27;
    public const int ENOSPC = 28;
    public const int ENXIO = 6;
    public const int EOPNOTSUPP = 95;
    public const int EDQUOT = 122;

    public static string Name(int errno) => errno switch
    {
        EPERM => "EPERM",
        EINTR => "EINTR",
        EIO => "EIO",
        EBADF => "EBADF",
        ENOMEM => "ENOMEM",
        EINVAL => "EINVAL",
        EFBIG => "EFBIG",
        ENOSPC => "ENOSPC",
        ENXIO => "ENXIO",
        EOPNOTSUPP => "EOPNOTSUPP",
        EDQUOT => "EDQUOT",
        _ => $"errno {errno}",
    };
}

/// <summary>
/// File operations .NET does not expose, or exposes in a way that hides errors.
/// </summary>
/// <remarks>
/// Why fsync is called directly: on .NET 10 (seen on 10.0.12) <c>RandomAccess.FlushToDisk</c> and
/// <c>FileStream.Flush(true)</c> return normally when fsync fails, because the runtime's
/// <c>SystemNative_FSync</c> reads <c>while ((result = fsync(fd) &lt; 0) &amp;&amp; errno == EINTR)</c>:
/// the comparison binds first, so a failure comes back as 1 and is never raised. A block device
/// that reports a failed flush as durable loses data silently, so we call libc ourselves.
/// </remarks>
public static partial class PosixFile
{
    private const int FALLOC_FL_KEEP_SIZE = 0x01;
    private const int FALLOC_FL_PUNCH_HOLE = 0x02;
    private const int FALLOC_FL_ZERO_RANGE = 0x10;
    private const int SEEK_DATA = 3;
    private const int SEEK_HOLE = 4;

    /// <summary>fsync (or fdatasync) that raises <see cref="PosixIOException"/> on failure.</summary>
    public static void FlushToDisk(SafeFileHandle handle, bool dataOnly = false, string? path = null)
    {
        int result = WithFd(handle, fd =>
        {
            int r;
            // EINTR is the only errno worth retrying; bounded so a signal storm cannot spin us forever.
            for (int attempt = 0; ; attempt++)
            {
                r = dataOnly ? fdatasync(fd) : fsync(fd);
                if (r == 0 || Marshal.GetLastPInvokeError() != Errnos.EINTR || attempt >= 16)
                {
                    break;
                }
            }
            return r == 0 ? 0 : Marshal.GetLastPInvokeError();
        });
        if (result != 0)
        {
            throw new PosixIOException(result, dataOnly ? "fdatasync" : "fsync", path);
        }
    }

    /// <summary>Deallocates a range (it then reads as zeroes). False when the filesystem can't.</summary>
    public static bool TryPunchHole(SafeFileHandle handle, long offset, long length) =>
        TryFallocate(handle, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length);

    /// <summary>Zeroes a range, keeping it allocated. False when the filesystem can't.</summary>
    public static bool TryZeroRange(SafeFileHandle handle, long offset, long length) =>
        TryFallocate(handle, FALLOC_FL_ZERO_RANGE | FALLOC_FL_KEEP_SIZE, offset, length);

    /// <summary>Allocates a range so later writes to it cannot fail with ENOSPC.</summary>
    public static void Allocate(SafeFileHandle handle, long offset, long length, string? path = null)
    {
        int errno = WithFd(handle, fd => fallocate(fd, 0, offset, length) == 0 ? 0 : Marshal.GetLastPInvokeError());
        if (errno != 0)
        {
            throw new PosixIOException(errno, "fallocate", path);
        }
    }

    /// <summary>
    /// The next offset at or after <paramref name="offset"/> that holds data (SEEK_DATA), or
    /// <paramref name="fileEnd"/> if none. Returns null when the filesystem cannot tell.
    /// </summary>
    public static long? SeekData(SafeFileHandle handle, long offset, long fileEnd) => Seek(handle, offset, SEEK_DATA, fileEnd);

    /// <summary>The next hole at or after <paramref name="offset"/> (SEEK_HOLE); the end of file counts as a hole.</summary>
    public static long? SeekHole(SafeFileHandle handle, long offset, long fileEnd) => Seek(handle, offset, SEEK_HOLE, fileEnd);

    private static long? Seek(SafeFileHandle handle, long offset, int whence, long fileEnd)
    {
        long errnoOrResult = 0;
        long position = WithFd(handle, fd =>
        {
            long p = lseek(fd, offset, whence);
            if (p < 0)
            {
                errnoOrResult = Marshal.GetLastPInvokeError();
            }
            return p;
        });
        if (position >= 0)
        {
            return position;
        }
        // ENXIO: no data (or hole) after offset.
        return errnoOrResult == Errnos.ENXIO ? fileEnd : null;
    }

    private static bool TryFallocate(SafeFileHandle handle, int mode, long offset, long length)
    {
        if (length == 0)
        {
            return true;
        }
        int errno = WithFd(handle, fd => fallocate(fd, mode, offset, length) == 0 ? 0 : Marshal.GetLastPInvokeError());
        return errno switch
        {
            0 => true,
            Errnos.EOPNOTSUPP or Errnos.EINVAL => false,
            _ => throw new PosixIOException(errno, "fallocate"),
        };
    }

    private static T WithFd<T>(SafeFileHandle handle, Func<int, T> action)
    {
        bool added = false;
        try
        {
            handle.DangerousAddRef(ref added);
            return action((int)handle.DangerousGetHandle());
        }
        finally
        {
            if (added)
            {
                handle.DangerousRelease();
            }
        }
    }

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int fsync(int fd);

    [LibraryImport("libc", EntryPoint = "fdatasync", SetLastError = true)]
    private static partial int fdatasync(int fd);

    [LibraryImport("libc", EntryPoint = "fallocate64", SetLastError = true)]
    private static partial int fallocate(int fd, int mode, long offset, long length);

    [LibraryImport("libc", EntryPoint = "lseek64", SetLastError = true)]
    private static partial long lseek(int fd, long offset, int whence);
}

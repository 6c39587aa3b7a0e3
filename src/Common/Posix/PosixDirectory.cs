using System.Runtime.InteropServices;

namespace NbdServer.Common.Posix;

/// <summary>
/// fsync of a directory, which .NET cannot open. Needed after creating or renaming a file: the new
/// name is only durable once its directory is flushed (a crash otherwise can lose a renamed file).
/// </summary>
public static partial class PosixDirectory
{
    private const int O_RDONLY = 0;
    private const int O_DIRECTORY = 0x10000;
    private const int O_CLOEXEC = 0x80000;

    public static void FlushToDisk(string path)
    {
        int fd = open(path, O_RDONLY | O_DIRECTORY | O_CLOEXEC);
        if (fd < 0)
        {
            throw new PosixIOException(Marshal.GetLastPInvokeError(), "open directory", path);
        }
        try
        {
            if (fsync(fd) != 0)
            {
                throw new PosixIOException(Marshal.GetLastPInvokeError(), "fsync directory", path);
            }
        }
        finally
        {
            _ = close(fd);
        }
    }

    [LibraryImport("libc", EntryPoint = "open", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int open(string path, int flags);

    [LibraryImport("libc", EntryPoint = "fsync", SetLastError = true)]
    private static partial int fsync(int fd);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int close(int fd);
}

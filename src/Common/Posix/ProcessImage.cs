using System.ComponentModel;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Win32.SafeHandles;

namespace NbdServer.Common.Posix;

/// <summary>
/// What a process needs to replace its own image with a fresh start of the same command line while
/// keeping chosen descriptors open: the way a daemon upgrades or reloads without dropping its
/// clients. The process ID stays, so a supervisor (systemd) sees a reload, not a restart.
/// .NET opens every descriptor close-on-exec; only those passed to <see cref="KeepAcrossExec"/> survive.
/// </summary>
public static partial class ProcessImage
{
    private const int F_GETFD = 1;
    private const int F_SETFD = 2;
    private const int FD_CLOEXEC = 1;
    private const uint MFD_CLOEXEC = 1;
    private const int SIG_UNBLOCK = 1;
    private const int SIG_SETMASK = 2;

    /// <summary>sigset_t of glibc: 1024 bits.</summary>
    private const int SigsetBytes = 128;

    /// <summary>Clears close-on-exec on <paramref name="fd"/>, so the next image inherits it under the same number.</summary>
    public static void KeepAcrossExec(int fd)
    {
        int flags = fcntl(fd, F_GETFD, 0);
        if (flags < 0 || fcntl(fd, F_SETFD, flags & ~FD_CLOEXEC) < 0)
        {
            throw new PosixIOException(Marshal.GetLastPInvokeError(), $"fcntl(F_SETFD) of descriptor {fd}");
        }
    }

    /// <summary>Sets close-on-exec on <paramref name="fd"/> again (an inherited descriptor this image now owns).</summary>
    public static void CloseOnExec(int fd)
    {
        int flags = fcntl(fd, F_GETFD, 0);
        if (flags < 0 || fcntl(fd, F_SETFD, flags | FD_CLOEXEC) < 0)
        {
            throw new PosixIOException(Marshal.GetLastPInvokeError(), $"fcntl(F_SETFD) of descriptor {fd}");
        }
    }

    /// <summary>
    /// Closes every socket above stderr that is not close-on-exec: what an earlier image meant to
    /// hand over when this image cannot take it (else its listening sockets would block the bind,
    /// and its clients would hang on sockets nobody reads). Only sockets: the runtime's own files
    /// are left alone. Returns how many were closed.
    /// </summary>
    public static int CloseInheritedSockets()
    {
        int closed = 0;
        foreach (string entry in Directory.GetFiles("/proc/self/fd"))
        {
            if (int.TryParse(Path.GetFileName(entry), out int fd) && fd > 2
                && new FileInfo(entry).LinkTarget is { } target && target.StartsWith("socket:", StringComparison.Ordinal))
            {
                int flags = fcntl(fd, F_GETFD, 0);
                if (flags >= 0 && (flags & FD_CLOEXEC) == 0 && close(fd) == 0)
                {
                    closed++;
                }
            }
        }
        return closed;
    }

    /// <summary>
    /// An anonymous file in memory (memfd), close-on-exec until <see cref="KeepAcrossExec"/>: the way
    /// to hand the next image a document of any size without touching a filesystem.
    /// </summary>
    public static SafeFileHandle CreateMemoryFile(string name)
    {
        int fd = memfd_create(name, MFD_CLOEXEC);
        if (fd < 0)
        {
            throw new PosixIOException(Marshal.GetLastPInvokeError(), "memfd_create", name);
        }
        return new SafeFileHandle(fd, ownsHandle: true);
    }

    /// <summary>
    /// The command line this process was started with, exactly (the runtime's own view drops the
    /// host's arguments when run as <c>dotnet app.dll</c>).
    /// </summary>
    public static string[] CommandLine()
    {
        byte[] raw = File.ReadAllBytes("/proc/self/cmdline");
        string text = Encoding.UTF8.GetString(raw);
        return text.TrimEnd('\0').Split('\0');
    }

    /// <summary>Null when <paramref name="path"/> can be executed, else why not.</summary>
    public static string? CannotExecute(string path) =>
        access(path, 1 /* X_OK */) == 0 ? null : $"'{path}' cannot be executed: {Describe(Marshal.GetLastPInvokeError())}";

    /// <summary>SIGHUP's number on Linux.</summary>
    public const int SIGHUP = 1;

    /// <summary>
    /// Replaces this process with <paramref name="path"/>: returns only if that failed, with the
    /// reason. The new image starts with exactly <paramref name="blockedSignal"/> blocked (the mask
    /// survives exec): such a signal arriving before the new image can handle it waits, pending,
    /// instead of taking its default action, until <see cref="UnblockSignal"/>.
    /// </summary>
    public static string Exec(string path, IReadOnlyList<string> arguments, IEnumerable<KeyValuePair<string, string>> environment, int blockedSignal)
    {
        Span<byte> mask = stackalloc byte[SigsetBytes];
        mask.Clear();
        SetBit(mask, blockedSignal);
        _ = pthread_sigmask(SIG_SETMASK, mask, IntPtr.Zero);
        string?[] argv = [.. arguments, null];
        string?[] envp = [.. environment.Select(p => $"{p.Key}={p.Value}"), null];
        _ = execve(path, argv, envp);
        return $"execve '{path}' failed: {Describe(Marshal.GetLastPInvokeError())}";
    }

    /// <summary>
    /// Unblocks <paramref name="signal"/> in the calling thread, so a pending one is delivered now.
    /// Threads inherit their creator's mask: call it on the main thread, which lives as long as the
    /// process, and every signal of that kind goes to it.
    /// </summary>
    public static void UnblockSignal(int signal)
    {
        Span<byte> mask = stackalloc byte[SigsetBytes];
        mask.Clear();
        SetBit(mask, signal);
        _ = pthread_sigmask(SIG_UNBLOCK, mask, IntPtr.Zero);
    }

    /// <summary>sigset_t: signal N is bit N-1, in native-endian 64-bit words (little-endian here).</summary>
    private static void SetBit(Span<byte> mask, int signal) => mask[(signal - 1) / 8] |= (byte)(1 << ((signal - 1) % 8));

    private static string Describe(int errno) => $"{Errnos.Name(errno)} ({new Win32Exception(errno).Message})";

    [LibraryImport("libc", EntryPoint = "fcntl", SetLastError = true)]
    private static partial int fcntl(int fd, int command, int argument);

    [LibraryImport("libc", EntryPoint = "close", SetLastError = true)]
    private static partial int close(int fd);

    [LibraryImport("libc", EntryPoint = "memfd_create", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int memfd_create(string name, uint flags);

    [LibraryImport("libc", EntryPoint = "access", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int access(string path, int mode);

    [LibraryImport("libc", EntryPoint = "pthread_sigmask")]
    private static partial int pthread_sigmask(int how, ReadOnlySpan<byte> set, IntPtr oldSet);

    [LibraryImport("libc", EntryPoint = "execve", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int execve(string path, string?[] argv, string?[] envp);
}

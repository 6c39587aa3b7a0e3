using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.Extensions.Logging;

namespace NbdServer.Frontend.Server;

/// <summary>
/// The NBD Unix socket: created with the configured permissions before anyone can connect, a stale
/// file from a crashed server replaced, a live one (another server) or a non-socket file left alone.
/// </summary>
internal static class UnixSocketListener
{
    public static Socket Bind(string path, UnixFileMode mode, ILogger logger)
    {
        if (OperatingSystem.IsWindows())
        {
            throw new PlatformNotSupportedException("the NBD Unix socket needs Linux file permissions");
        }
        RemoveIfStale(path, logger);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            socket.Bind(new UnixDomainSocketEndPoint(path));
            // Before Listen nobody can connect (connect gets ECONNREFUSED), so the umask's mode the
            // socket was created with is never usable: the permissions below are the ones that count.
            File.SetUnixFileMode(path, mode);
            socket.Listen(128);
            return socket;
        }
        catch
        {
            socket.Dispose();
            throw;
        }
    }

    /// <summary>Removes the socket file at shutdown (only if it is still a socket).</summary>
    public static void Remove(string path)
    {
        try
        {
            if (IsSocket(path))
            {
                File.Delete(path);
            }
        }
        catch (Exception e) when (e is IOException or UnauthorizedAccessException)
        {
            // Nothing to do: the next start finds it stale and replaces it.
        }
    }

    private static void RemoveIfStale(string path, ILogger logger)
    {
        if (!File.Exists(path) && !Directory.Exists(path) && !IsSocket(path))
        {
            return;
        }
        if (!IsSocket(path))
        {
            throw new IOException($"{path} exists and is not a socket; not replacing it (remove it, or choose another unix path).");
        }
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e) when (e.SocketErrorCode is SocketError.ConnectionRefused or SocketError.AddressNotAvailable)
        {
            File.Delete(path);
            FrontendLog.StaleSocketRemoved(logger, path);
            return;
        }
        throw new IOException($"{path} is in use by a running server; stop it first (or choose another unix path).");
    }

    /// <summary>
    /// True when <paramref name="path"/> itself (not a link's target) is a socket. .NET reports every
    /// non-directory as "Normal", and a connect to any non-socket file is refused just like one to a
    /// stale socket, so the type comes from statx(2), whose struct layout is the same on every Linux
    /// architecture (stx_mode: 16 bits at byte 28).
    /// </summary>
    private static unsafe bool IsSocket(string path)
    {
        const int AtFdCwd = -100;
        const int AtSymlinkNoFollow = 0x100;
        const uint StatxType = 0x1;
        const int StatxSize = 256;
        const int ModeOffset = 28;
        const int TypeMask = 0xF000;
        const int SocketType = 0xC000;
        if (!NativeLibrary.TryGetExport(NativeLibrary.GetMainProgramHandle(), "statx", out IntPtr statx))
        {
            throw new IOException($"cannot tell whether {path} is a socket (no statx in libc); remove it by hand.");
        }
        byte[] name = Encoding.UTF8.GetBytes(path + "\0");
        byte* buffer = stackalloc byte[StatxSize];
        int result;
        fixed (byte* p = name)
        {
            result = ((delegate* unmanaged<int, byte*, int, uint, byte*, int>)statx)(AtFdCwd, p, AtSymlinkNoFollow, StatxType, buffer);
        }
        if (result != 0)
        {
            return false;
        }
        ushort mode = *(ushort*)(buffer + ModeOffset);
        return (mode & TypeMask) == SocketType;
    }
}

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
    private const uint PermissionBits = 0x1FF;
    private const int TypeMask = 0xF000;
    private const int SocketFileType = 0xC000;

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
            // The file is born with the configured mode: bind(2) applies the umask, so it is set to
            // exactly the bits the mode leaves out for the bind. A chmod by path afterwards would follow
            // a symlink someone swapped in for the fresh socket (chmod-ing a file of their choosing with
            // our privileges), and would leave a window with the umask's mode.
            uint previous = SetUmask(~(uint)mode & PermissionBits);
            try
            {
                socket.Bind(new UnixDomainSocketEndPoint(path));
            }
            finally
            {
                SetUmask(previous);
            }
            if (Stat(path) is not { } stat || (stat & TypeMask) != SocketFileType || (UnixFileMode)(stat & PermissionBits) != mode)
            {
                throw new IOException($"{path} was replaced or changed while the NBD socket was created; not listening on it.");
            }
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

    /// <summary>Sets the process umask; returns the previous one.</summary>
    private static unsafe uint SetUmask(uint mask)
    {
        if (!NativeLibrary.TryGetExport(NativeLibrary.GetMainProgramHandle(), "umask", out IntPtr umask))
        {
            throw new IOException("cannot set the file mode of the NBD Unix socket (no umask in libc).");
        }
        return ((delegate* unmanaged<uint, uint>)umask)(mask);
    }

    private static bool IsSocket(string path) => Stat(path) is { } mode && (mode & TypeMask) == SocketFileType;

    /// <summary>
    /// The st_mode of <paramref name="path"/> itself (not a link's target); null if it does not exist. .NET reports every
    /// non-directory as "Normal", and a connect to any non-socket file is refused just like one to a
    /// stale socket, so the type comes from statx(2), whose struct layout is the same on every Linux
    /// architecture (stx_mode: 16 bits at byte 28).
    /// </summary>
    private static unsafe int? Stat(string path)
    {
        const int AtFdCwd = -100;
        const int AtSymlinkNoFollow = 0x100;
        const uint StatxType = 0x1;
        const int StatxSize = 256;
        const int ModeOffset = 28;
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
            return null;
        }
        return *(ushort*)(buffer + ModeOffset);
    }
}

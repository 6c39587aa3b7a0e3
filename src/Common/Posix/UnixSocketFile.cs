using System.Buffers.Binary;
using System.Net.Sockets;
using System.Runtime.InteropServices;

namespace NbdServer.Common.Posix;

/// <summary>What <c>statx</c> says about a path (not following a final symlink).</summary>
public readonly record struct PosixFileStatus(bool IsSocket, UnixFileMode Mode, uint Uid, uint Gid, ulong Inode);

/// <summary>
/// The file of a listening Unix socket: a stale one left by a killed process is removed, a live one
/// (another server answers) or a non-socket file at the path is refused, the new socket appears at
/// its path already with its final mode, and only our own socket is removed at the end.
/// </summary>
public static partial class UnixSocketFile
{
    private const int AtFdCwd = -100;
    private const int AtSymlinkNoFollow = 0x100;
    private const uint StatxType = 0x1, StatxMode = 0x2, StatxUid = 0x8, StatxGid = 0x10, StatxIno = 0x100;
    private const int SIfMt = 0xF000, SIfSock = 0xC000;
    private const int ENOENT = 2;

    // struct statx is the same on every Linux architecture (unlike struct stat): offsets from linux/stat.h.
    private const int StatxSize = 256, UidOffset = 20, GidOffset = 24, ModeOffset = 28, InodeOffset = 32;

    /// <summary>The status of <paramref name="path"/>, or null when nothing is there.</summary>
    public static PosixFileStatus? Stat(string path)
    {
        Span<byte> buffer = stackalloc byte[StatxSize];
        if (statx(AtFdCwd, path, AtSymlinkNoFollow, StatxType | StatxMode | StatxUid | StatxGid | StatxIno, ref MemoryMarshal.GetReference(buffer)) != 0)
        {
            int errno = Marshal.GetLastPInvokeError();
            return errno == ENOENT ? null : throw new PosixIOException(errno, "statx", path);
        }
        int mode = BinaryPrimitives.ReadUInt16LittleEndian(buffer[ModeOffset..]);
        return new PosixFileStatus(
            (mode & SIfMt) == SIfSock,
            (UnixFileMode)(mode & 0xFFF),
            BinaryPrimitives.ReadUInt32LittleEndian(buffer[UidOffset..]),
            BinaryPrimitives.ReadUInt32LittleEndian(buffer[GidOffset..]),
            BinaryPrimitives.ReadUInt64LittleEndian(buffer[InodeOffset..]));
    }

    /// <summary>
    /// Listens on a Unix socket at <paramref name="path"/> whose file has exactly <paramref name="mode"/>
    /// from the moment it appears: it is bound inside a fresh 0700 directory beside the path, given its
    /// mode there, then renamed into place, so no other user can connect in between whatever the umask.
    /// Returns the socket and the inode to pass to <see cref="Remove"/>.
    /// </summary>
    public static (Socket Socket, ulong Inode) Listen(string path, UnixFileMode mode, int backlog)
    {
        if (OperatingSystem.IsWindows())
        {
            throw new PlatformNotSupportedException("Unix socket files with a mode need Linux.");
        }
        string directory = Path.GetDirectoryName(Path.GetFullPath(path)) ?? "/";
        ClaimStale(path);
        string staging = Path.Combine(directory, $".sock-{Guid.NewGuid():N}");
        Directory.CreateDirectory(staging, UnixFileMode.UserRead | UnixFileMode.UserWrite | UnixFileMode.UserExecute);
        var socket = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            string staged = Path.Combine(staging, "s");
            socket.Bind(new UnixDomainSocketEndPoint(staged));
            File.SetUnixFileMode(staged, mode);
            socket.Listen(backlog);
            File.Move(staged, path, overwrite: false);
            return (socket, Stat(path)!.Value.Inode);
        }
        catch
        {
            socket.Dispose();
            throw;
        }
        finally
        {
            Directory.Delete(staging, recursive: true);
        }
    }

    /// <summary>Removes the socket file if it is still the one we created (another server may have replaced it).</summary>
    public static void Remove(string path, ulong inode)
    {
        try
        {
            if (Stat(path) is { IsSocket: true } s && s.Inode == inode)
            {
                File.Delete(path);
            }
        }
        catch (IOException)
        {
            // Best effort at shutdown: a socket file left behind is cleaned up by the next start.
        }
    }

    /// <summary>
    /// Frees <paramref name="path"/> for a new socket: nothing there is fine, a socket nobody listens on
    /// (a killed server's) is deleted; a live socket or any other kind of file is refused.
    /// </summary>
    private static void ClaimStale(string path)
    {
        if (Stat(path) is not { } status)
        {
            return;
        }
        if (!status.IsSocket)
        {
            throw new IOException($"'{path}' exists and is not a socket; refusing to replace it.");
        }
        using var probe = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified);
        try
        {
            probe.Connect(new UnixDomainSocketEndPoint(path));
        }
        catch (SocketException e) when (e.SocketErrorCode == SocketError.ConnectionRefused)
        {
            File.Delete(path);
            return;
        }
        throw new IOException($"'{path}' is in use by another running server.");
    }

    [LibraryImport("libc", EntryPoint = "statx", SetLastError = true, StringMarshalling = StringMarshalling.Utf8)]
    private static partial int statx(int dirfd, string path, int flags, uint mask, ref byte buffer);
}

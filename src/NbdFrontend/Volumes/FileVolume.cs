using System.Runtime.InteropServices;
using Microsoft.Win32.SafeHandles;
using NbdServer.Common.Posix;
using NbdServer.Common.Volumes;

namespace NbdServer.Frontend.Volumes;

/// <summary>
/// One regular file (or block device) as a volume, like <c>qemu-nbd file</c>: positional IO,
/// fsync that reports its errors, hole punching for TRIM, SEEK_DATA/SEEK_HOLE for block status.
/// </summary>
internal sealed partial class FileVolume : IBlockVolume
{
    private const int ZeroChunk = 1024 * 1024;
    private static readonly ReadOnlyMemory<byte> Zeroes = new byte[ZeroChunk];

    private readonly SafeFileHandle _handle;
    private readonly string _path;

    private FileVolume(SafeFileHandle handle, string path, long size, bool readOnly)
    {
        _handle = handle;
        _path = path;
        Size = size;
        Features = VolumeFeatures.Flush | VolumeFeatures.ForceUnitAccess | VolumeFeatures.Trim | VolumeFeatures.WriteZeroes
            | VolumeFeatures.FastZero | VolumeFeatures.MultiConnection | VolumeFeatures.Cache | VolumeFeatures.BlockStatus
            | (readOnly ? VolumeFeatures.ReadOnly : VolumeFeatures.None);
    }

    public long Size { get; }

    public VolumeFeatures Features { get; }

    public int MinimumBlockSize => 1;

    public int PreferredBlockSize => 4096;

    /// <summary>Opens <paramref name="path"/>, creating it sparse with <paramref name="createSize"/> bytes if it does not exist.</summary>
    public static FileVolume Open(string path, long? createSize, bool readOnly)
    {
        string fullPath = Path.GetFullPath(path);
        if (!File.Exists(fullPath))
        {
            if (createSize is not { } size)
            {
                throw new FileNotFoundException($"Volume file '{fullPath}' does not exist (give a size to create it).", fullPath);
            }
            Directory.CreateDirectory(Path.GetDirectoryName(fullPath)!);
            using SafeFileHandle created = File.OpenHandle(fullPath, FileMode.CreateNew, FileAccess.ReadWrite, FileShare.None);
            RandomAccess.SetLength(created, size);
        }
        SafeFileHandle handle = File.OpenHandle(fullPath, FileMode.Open, readOnly ? FileAccess.Read : FileAccess.ReadWrite, FileShare.ReadWrite);
        long length = RandomAccess.GetLength(handle);
        // Keep the size fixed across restarts: a client using `nbd-client -persist` aborts on a change.
        if (createSize is { } wanted && wanted != length)
        {
            handle.Dispose();
            throw new InvalidOperationException($"Volume file '{fullPath}' is {length} bytes, not the {wanted} bytes configured; refusing to resize it.");
        }
        return new FileVolume(handle, fullPath, length, readOnly);
    }

    /// <summary>
    /// Largest read or write done inline on the caller's thread. A 4 KiB pread from the page cache or
    /// buffered pwrite into it takes a few microseconds here, less than handing it to a pool thread
    /// and waking the sender from there (on 2 CPUs the hand-off doubled the futex calls per IO);
    /// larger ones still run on the pool, beside the request loop, so big copies overlap.
    /// </summary>
    private const int InlineIoLimit = 64 << 10;

    private const int RWF_NOWAIT = 0x8;
    private const int EAGAIN = 11;

    // Cleared once the kernel or filesystem refuses RWF_NOWAIT reads: then every read takes the pool.
    private volatile bool _nowaitReads = true;

    public ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken) =>
        TryReadCached(offset, destination.Span) ? ValueTask.CompletedTask : ReadOnPoolAsync(offset, destination, cancellationToken);

    /// <summary>
    /// Reads inline only what the page cache holds whole: RWF_NOWAIT makes preadv2 fail with EAGAIN
    /// instead of waiting for the disk, so a cache miss never stalls the request loop.
    /// </summary>
    private unsafe bool TryReadCached(long offset, Span<byte> destination)
    {
        if (!_nowaitReads || destination.Length > InlineIoLimit || destination.IsEmpty)
        {
            return false;
        }
        fixed (byte* start = destination)
        {
            var vector = new IoVector { Base = start, Length = (nuint)destination.Length };
            long read = preadv2(_handle, &vector, 1, offset, RWF_NOWAIT);
            if (read < 0 && Marshal.GetLastPInvokeError() is not (EAGAIN or Errnos.EINTR))
            {
                // EOPNOTSUPP / EINVAL: no RWF_NOWAIT here; a real IO error is reported by the pool path.
                _nowaitReads = false;
            }
            return read == destination.Length;
        }
    }

    private async ValueTask ReadOnPoolAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        try
        {
            while (!destination.IsEmpty)
            {
                int read = await RandomAccess.ReadAsync(_handle, destination, offset, cancellationToken);
                if (read == 0)
                {
                    // A block device or file shrunk under us: the tail reads as zeroes rather than hanging.
                    destination.Span.Clear();
                    return;
                }
                destination = destination[read..];
                offset += read;
            }
        }
        catch (IOException e)
        {
            throw Translate(e, "read", offset);
        }
    }

    public ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, WriteOptions options, CancellationToken cancellationToken)
    {
        if (source.Length > InlineIoLimit || (options & WriteOptions.ForceUnitAccess) != 0)
        {
            return WriteOnPoolAsync(offset, source, options, cancellationToken);
        }
        // A small buffered write is a copy into the page cache: inline (see InlineIoLimit).
        try
        {
            RandomAccess.Write(_handle, source.Span, offset);
            return ValueTask.CompletedTask;
        }
        catch (IOException e)
        {
            return ValueTask.FromException(Translate(e, "write", offset));
        }
    }

    private async ValueTask WriteOnPoolAsync(long offset, ReadOnlyMemory<byte> source, WriteOptions options, CancellationToken cancellationToken)
    {
        try
        {
            await RandomAccess.WriteAsync(_handle, source, offset, cancellationToken);
            if ((options & WriteOptions.ForceUnitAccess) != 0)
            {
                await FlushAsync(cancellationToken);
            }
        }
        catch (IOException e)
        {
            throw Translate(e, "write", offset);
        }
    }

    public ValueTask FlushAsync(CancellationToken cancellationToken) => RunBlocking(() => PosixFile.FlushToDisk(_handle, dataOnly: true, _path), "flush", 0);

    public async ValueTask TrimAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken)
    {
        // TRIM is advisory: if the filesystem cannot punch holes, doing nothing is correct.
        await RunBlocking(() => PosixFile.TryPunchHole(_handle, offset, length), "trim", offset);
        if ((options & WriteOptions.ForceUnitAccess) != 0)
        {
            await FlushAsync(cancellationToken);
        }
    }

    public async ValueTask WriteZeroesAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken)
    {
        bool noHole = (options & WriteOptions.NoHole) != 0;
        bool done = await RunBlocking(
            () => (!noHole && PosixFile.TryPunchHole(_handle, offset, length)) || PosixFile.TryZeroRange(_handle, offset, length),
            "write zeroes",
            offset);
        if (!done)
        {
            if ((options & WriteOptions.FastZero) != 0)
            {
                throw new VolumeException(VolumeError.NotSupported, "this filesystem cannot zero a range without writing it");
            }
            // Slow path: write zero buffers a chunk at a time so a 4 GiB request never allocates 4 GiB.
            for (long done2 = 0; done2 < length; done2 += ZeroChunk)
            {
                int count = (int)Math.Min(ZeroChunk, length - done2);
                await WriteAsync(offset + done2, Zeroes[..count], WriteOptions.None, cancellationToken);
            }
        }
        if ((options & WriteOptions.ForceUnitAccess) != 0)
        {
            await FlushAsync(cancellationToken);
        }
    }

    public ValueTask<IReadOnlyList<AllocationExtent>> GetAllocationAsync(long offset, long length, int maxExtents, CancellationToken cancellationToken)
    {
        long end = offset + length;
        var extents = new List<AllocationExtent>();
        while (offset < end && extents.Count < maxExtents)
        {
            long? data = PosixFile.SeekData(_handle, offset, Size);
            if (data is null)
            {
                // The filesystem can't tell: "data" is always a safe answer.
                extents.Add(new AllocationExtent(end - offset, AllocationState.Data));
                break;
            }
            if (data.Value > offset)
            {
                long holeEnd = Math.Min(data.Value, end);
                extents.Add(new AllocationExtent(holeEnd - offset, AllocationState.Hole | AllocationState.Zero));
                offset = holeEnd;
                continue;
            }
            long hole = PosixFile.SeekHole(_handle, offset, Size) ?? end;
            long dataEnd = Math.Min(Math.Max(hole, offset + 1), end);
            extents.Add(new AllocationExtent(dataEnd - offset, AllocationState.Data));
            offset = dataEnd;
        }
        return ValueTask.FromResult<IReadOnlyList<AllocationExtent>>(extents);
    }

    public ValueTask DisposeAsync()
    {
        _handle.Dispose();
        return ValueTask.CompletedTask;
    }

    private async ValueTask<T> RunBlocking<T>(Func<T> action, string operation, long offset)
    {
        try
        {
            return await Task.Run(action);
        }
        catch (IOException e)
        {
            throw Translate(e, operation, offset);
        }
    }

    private async ValueTask RunBlocking(Action action, string operation, long offset) =>
        await RunBlocking(() => { action(); return true; }, operation, offset);

    private VolumeException Translate(IOException e, string operation, long offset)
    {
        int errno = e is PosixIOException p ? p.Errno : e.HResult;
        VolumeError error = errno is Errnos.ENOSPC or Errnos.EDQUOT or Errnos.EFBIG ? VolumeError.NoSpace : VolumeError.IoError;
        return new VolumeException(error, $"{operation} at offset {offset} of '{_path}' failed: {e.Message}", e);
    }

    [StructLayout(LayoutKind.Sequential)]
    private unsafe struct IoVector
    {
        public byte* Base;
        public nuint Length;
    }

    [LibraryImport("libc", EntryPoint = "preadv2", SetLastError = true)]
    private static unsafe partial long preadv2(SafeFileHandle fd, IoVector* vectors, int count, long offset, int flags);
}

namespace NbdServer.Common.Volumes;

/// <summary>
/// A byte-addressed block device: what the NBD frontend serves. Implemented by the simple
/// single-copy volumes (memory, file) and by the replicated volume of the replica engine.
/// </summary>
/// <remarks>
/// Callers validate ranges against <see cref="Size"/> before calling; implementations may assume
/// <c>offset + length &lt;= Size</c>. Failures are reported as <see cref="VolumeException"/>.
/// A completed write is visible to every later read on every connection; a completed flush makes
/// every write completed before it durable (this is what lets the frontend offer multi-conn).
/// </remarks>
public interface IBlockVolume : IAsyncDisposable
{
    long Size { get; }

    VolumeFeatures Features { get; }

    /// <summary>Smallest IO granularity the volume accepts (1 = any byte).</summary>
    int MinimumBlockSize { get; }

    /// <summary>The IO size the volume prefers (alignment that avoids read-modify-write).</summary>
    int PreferredBlockSize { get; }

    ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken);

    ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, WriteOptions options, CancellationToken cancellationToken);

    ValueTask FlushAsync(CancellationToken cancellationToken);

    /// <summary>Discards a range: afterwards its contents are unspecified (they read as zeroes here).</summary>
    ValueTask TrimAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken);

    /// <summary>Makes a range read as zeroes, without the caller sending zero bytes.</summary>
    ValueTask WriteZeroesAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken);

    /// <summary>
    /// Describes allocation from <paramref name="offset"/>: consecutive extents covering at most
    /// <paramref name="length"/> bytes (at least one extent, at most <paramref name="maxExtents"/>).
    /// </summary>
    ValueTask<IReadOnlyList<AllocationExtent>> GetAllocationAsync(long offset, long length, int maxExtents, CancellationToken cancellationToken);
}

[Flags]
public enum VolumeFeatures
{
    None = 0,
    ReadOnly = 1 << 0,
    Flush = 1 << 1,
    ForceUnitAccess = 1 << 2,
    Trim = 1 << 3,
    WriteZeroes = 1 << 4,

    /// <summary>WRITE_ZEROES can promise to be fast (or fail at once with NotSupported).</summary>
    FastZero = 1 << 5,

    /// <summary>Flush and FUA are visible across all connections (one shared cache or none).</summary>
    MultiConnection = 1 << 6,
    Cache = 1 << 7,
    BlockStatus = 1 << 8,
}

[Flags]
public enum WriteOptions
{
    None = 0,

    /// <summary>Durable before completion (NBD FUA).</summary>
    ForceUnitAccess = 1 << 0,

    /// <summary>Write zeroes must leave the range allocated (NBD NO_HOLE).</summary>
    NoHole = 1 << 1,

    /// <summary>Fail with <see cref="VolumeError.NotSupported"/> rather than zero slowly (NBD FAST_ZERO).</summary>
    FastZero = 1 << 2,
}

[Flags]
public enum AllocationState
{
    Data = 0,
    Hole = 1,
    Zero = 2,
}

public readonly record struct AllocationExtent(long Length, AllocationState State);

public enum VolumeError
{
    IoError,
    NoSpace,
    NotSupported,
    ReadOnly,
    InvalidArgument,
    Shutdown,
}

/// <summary>A failed volume operation, typed so the frontend can send the right NBD errno.</summary>
public sealed class VolumeException : Exception
{
    public VolumeException(VolumeError error, string message, Exception? innerException = null)
        : base(message, innerException) => Error = error;

    public VolumeError Error { get; }
}

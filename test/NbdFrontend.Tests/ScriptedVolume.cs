using NbdServer.Common.Volumes;
using NbdServer.Frontend.Volumes;

namespace NbdServer.Frontend.Tests;

/// <summary>
/// A memory volume whose operations can be held at a gate or made to fail, so tests can observe
/// ordering, draining and backpressure deterministically.
/// </summary>
internal sealed class ScriptedVolume(long size, VolumeFeatures? features = null) : IBlockVolume
{
    private readonly MemoryVolume _inner = new(size);
    private int _writesStarted;
    private int _zeroesStarted;
    private int _flushes;

    /// <summary>When set, reads and writes wait for it before touching data.</summary>
    public TaskCompletionSource? Gate { get; set; }

    /// <summary>Reads at this offset wait for <see cref="Gate"/>; others run at once.</summary>
    public long? GatedReadOffset { get; set; }

    public VolumeException? FailWith { get; set; }

    public int WritesStarted => Volatile.Read(ref _writesStarted);

    /// <summary>WRITE_ZEROES requests that reached the volume (gated like writes).</summary>
    public int ZeroesStarted => Volatile.Read(ref _zeroesStarted);

    public int Flushes => Volatile.Read(ref _flushes);

    public long Size => _inner.Size;

    public VolumeFeatures Features { get; } = features ?? DefaultFeatures(size);

    public int MinimumBlockSize => 1;

    public int PreferredBlockSize => 4096;

    /// <summary>
    /// When set, a read at <see cref="GatedReadOffset"/> blocks its calling thread (the request
    /// loop's, when the volume completes inline) until it is set; <see cref="BlockedReadEntered"/>
    /// says it got there.
    /// </summary>
    public ManualResetEventSlim? BlockingReadGate { get; set; }

    public ManualResetEventSlim BlockedReadEntered { get; } = new();

    public async ValueTask ReadAsync(long offset, Memory<byte> destination, CancellationToken cancellationToken)
    {
        if (BlockingReadGate is { } blocking && GatedReadOffset == offset)
        {
            BlockedReadEntered.Set();
            blocking.Wait(cancellationToken);
        }
        if (Gate is { } gate && (GatedReadOffset is null || GatedReadOffset == offset))
        {
            await gate.Task.WaitAsync(cancellationToken);
        }
        ThrowIfFailing();
        await _inner.ReadAsync(offset, destination, cancellationToken);
    }

    public async ValueTask WriteAsync(long offset, ReadOnlyMemory<byte> source, WriteOptions options, CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _writesStarted);
        if (Gate is { } gate)
        {
            await gate.Task.WaitAsync(cancellationToken);
        }
        ThrowIfFailing();
        await _inner.WriteAsync(offset, source, options, cancellationToken);
    }

    public ValueTask FlushAsync(CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _flushes);
        ThrowIfFailing();
        return ValueTask.CompletedTask;
    }

    public ValueTask TrimAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken)
    {
        ThrowIfFailing();
        return _inner.TrimAsync(offset, length, options, cancellationToken);
    }

    public async ValueTask WriteZeroesAsync(long offset, long length, WriteOptions options, CancellationToken cancellationToken)
    {
        Interlocked.Increment(ref _zeroesStarted);
        if (Gate is { } gate)
        {
            await gate.Task.WaitAsync(cancellationToken);
        }
        ThrowIfFailing();
        await _inner.WriteZeroesAsync(offset, length, options, cancellationToken);
    }

    public ValueTask<IReadOnlyList<AllocationExtent>> GetAllocationAsync(long offset, long length, int maxExtents, CancellationToken cancellationToken) =>
        _inner.GetAllocationAsync(offset, length, maxExtents, cancellationToken);

    public ValueTask DisposeAsync() => _inner.DisposeAsync();

    private void ThrowIfFailing()
    {
        if (FailWith is { } failure)
        {
            throw failure;
        }
    }

    private static VolumeFeatures DefaultFeatures(long size) => new MemoryVolume(size).Features;
}

namespace NbdServer.Downstairs.Server;

/// <summary>
/// Process-wide cap on frame bodies being received and payloads in flight, across every connection
/// (<see cref="DownstairsOptions.MaxMemoryBytes"/>). A connection that cannot get its bytes stops reading
/// its socket until others release some: the process never grows past the cap, TCP pushes back.
/// </summary>
/// <remarks>
/// The last <c>writerReserve</c> bytes are for the current writer only, so readers, probes and
/// strangers together can never starve the upstairs that owns the region. Taking and releasing are
/// lock-free (one compare-and-swap); the lock is only touched while someone waits.
/// </remarks>
internal sealed class MemoryBudget
{
    private readonly Lock _lock = new();
    private long _used;
    private int _waiting;
    private TaskCompletionSource? _released;

    public MemoryBudget(long capacity, long writerReserve)
    {
        ArgumentOutOfRangeException.ThrowIfLessThan(capacity, writerReserve);
        Capacity = capacity;
        WriterReserve = writerReserve;
    }

    public long Capacity { get; }

    public long WriterReserve { get; }

    public long Used => Interlocked.Read(ref _used);

    public bool TryTake(long bytes, bool writer)
    {
        long limit = writer ? Capacity : Capacity - WriterReserve;
        while (true)
        {
            long used = Volatile.Read(ref _used);
            // Past the limit only when nothing else is held: one frame must always be able to pass,
            // or a frame larger than the shared part would wait forever.
            if (used > limit - bytes && used != 0)
            {
                return false;
            }
            if (Interlocked.CompareExchange(ref _used, used + bytes, used) == used)
            {
                return true;
            }
        }
    }

    /// <summary>Takes <paramref name="bytes"/>, waiting while the cap is reached. <paramref name="writer"/> is asked again on every try.</summary>
    public async ValueTask TakeAsync(long bytes, Func<bool> writer, CancellationToken cancellationToken)
    {
        while (!TryTake(bytes, writer()))
        {
            Task wake;
            lock (_lock)
            {
                _waiting++;
                wake = (_released ??= new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously)).Task;
            }
            try
            {
                // Re-check once registered: a release in between saw no waiter and woke no one.
                if (TryTake(bytes, writer()))
                {
                    return;
                }
                await wake.WaitAsync(cancellationToken).ConfigureAwait(false);
            }
            finally
            {
                lock (_lock)
                {
                    _waiting--;
                }
            }
        }
    }

    public void Release(long bytes)
    {
        if (bytes == 0)
        {
            return;
        }
        Interlocked.Add(ref _used, -bytes);
        if (Volatile.Read(ref _waiting) > 0)
        {
            TaskCompletionSource? wake;
            lock (_lock)
            {
                wake = _released;
                _released = null;
            }
            wake?.TrySetResult();
        }
    }
}

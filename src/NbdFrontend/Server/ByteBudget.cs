namespace NbdServer.Frontend.Server;

/// <summary>
/// A count of bytes that may be held at once, with FIFO async waiting. A request larger than the
/// whole budget is charged the whole budget, so it still runs (alone) instead of waiting forever.
/// </summary>
internal sealed class ByteBudget(long capacity)
{
    private readonly Lock _lock = new();
    private readonly Queue<(long Bytes, TaskCompletionSource Ready)> _waiters = new();
    private long _available = capacity;

    public long Capacity { get; } = capacity;

    public long InUse
    {
        get
        {
            lock (_lock)
            {
                return Capacity - _available;
            }
        }
    }

    public long Clamp(long bytes) => Math.Min(bytes, Capacity);

    /// <summary>Takes <paramref name="bytes"/> (already clamped), waiting while the budget is spent.</summary>
    public ValueTask AcquireAsync(long bytes, CancellationToken cancellationToken)
    {
        if (bytes == 0)
        {
            return ValueTask.CompletedTask;
        }
        TaskCompletionSource ready;
        lock (_lock)
        {
            if (_waiters.Count == 0 && _available >= bytes)
            {
                _available -= bytes;
                return ValueTask.CompletedTask;
            }
            ready = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _waiters.Enqueue((bytes, ready));
        }
        return WaitAsync(bytes, ready, cancellationToken);
    }

    /// <summary>
    /// Gives back <paramref name="bytes"/> and grants waiters in order. Also called with 0 when a
    /// waiter is cancelled: the ones queued behind it may fit now and must not wait for a release.
    /// </summary>
    /// <summary>Takes <paramref name="bytes"/> now if they are free and nobody waits ahead; never waits.</summary>
    public bool TryAcquire(long bytes)
    {
        if (bytes == 0)
        {
            return true;
        }
        lock (_lock)
        {
            if (_waiters.Count == 0 && _available >= bytes)
            {
                _available -= bytes;
                return true;
            }
            return false;
        }
    }

    public void Release(long bytes)
    {
        lock (_lock)
        {
            _available += bytes;
            while (_waiters.TryPeek(out var head))
            {
                if (head.Ready.Task.IsCompleted)
                {
                    // Cancelled waiter: its bytes were never taken.
                    _waiters.Dequeue();
                    continue;
                }
                if (head.Bytes > _available)
                {
                    break;
                }
                _available -= head.Bytes;
                _waiters.Dequeue();
                // Completed under the lock so a racing cancellation can't also win and leak the bytes;
                // continuations run asynchronously, never inside this lock.
                head.Ready.TrySetResult();
            }
        }
    }

    private async ValueTask WaitAsync(long bytes, TaskCompletionSource ready, CancellationToken cancellationToken)
    {
        await using (cancellationToken.Register(() =>
        {
            lock (_lock)
            {
                // Only a waiter not yet granted may cancel; a granted one owns its bytes.
                if (ready.Task.IsCompleted)
                {
                    return;
                }
                ready.TrySetCanceled(cancellationToken);
            }
            Release(0);
        }))
        {
            await ready.Task;
        }
    }
}

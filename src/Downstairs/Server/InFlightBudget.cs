namespace NbdServer.Downstairs.Server;

/// <summary>
/// Jobs and payload bytes a connection may hold from admission until its reply is on the wire.
/// The reader waits here before taking the next frame off the socket, so an engine that stops
/// reading replies soon stops being able to send requests: TCP carries the backpressure, and the
/// downstairs' memory stays flat.
/// </summary>
internal sealed class InFlightBudget(int maxJobs, long maxBytes)
{
    private readonly Lock _lock = new();
    private int _jobs;
    private long _bytes;
    private TaskCompletionSource? _waiter;
    private long _waitBytes;

    public int Jobs => Volatile.Read(ref _jobs);

    public long Bytes => Interlocked.Read(ref _bytes);

    /// <summary>Takes one job slot and <paramref name="bytes"/>. Only one caller (the reader) waits at a time.</summary>
    public ValueTask TakeAsync(long bytes, CancellationToken cancellationToken)
    {
        TaskCompletionSource waiter;
        lock (_lock)
        {
            if (Fits(bytes))
            {
                _jobs++;
                _bytes += bytes;
                return ValueTask.CompletedTask;
            }
            waiter = _waiter = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
            _waitBytes = bytes;
        }
        return new ValueTask(waiter.Task.WaitAsync(cancellationToken));
    }

    public void Release(long bytes)
    {
        TaskCompletionSource? wake = null;
        lock (_lock)
        {
            _jobs--;
            _bytes -= bytes;
            if (_waiter is not null && Fits(_waitBytes))
            {
                _jobs++;
                _bytes += _waitBytes;
                wake = _waiter;
                _waiter = null;
            }
        }
        wake?.TrySetResult();
    }

    // A single frame larger than the byte budget is still admitted when nothing else is in flight;
    // refusing it would deadlock the link.
    private bool Fits(long bytes) => _jobs < maxJobs && (_bytes + bytes <= maxBytes || _jobs == 0);
}

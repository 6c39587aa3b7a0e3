using System.Threading.Tasks.Sources;

namespace NbdServer.Frontend.Qos;

/// <summary>
/// A connection's one wait for its export's buckets: one timer per connection, re-armed per wait,
/// and a reusable awaitable, so a throttled request creates no timer and no task. The wait ends
/// when the timer fires, when the limits change (<see cref="Wake"/>) or when the connection is
/// aborted (an <see cref="OperationCanceledException"/>). One wait at a time: the request loop's.
/// </summary>
internal sealed class QosWaiter : IValueTaskSource, IDisposable
{
    private readonly ITimer _timer;
    private ManualResetValueTaskSourceCore<bool> _core = new() { RunContinuationsAsynchronously = true };
    private CancellationTokenRegistration _cancellation;
    private CancellationToken _token;

    // 1 while a wait is armed and not yet ended; whoever swaps it to 0 ends the wait.
    private int _armed;

    public QosWaiter(TimeProvider time)
    {
        Time = time;
        _timer = time.CreateTimer(static state => ((QosWaiter)state!).Wake(), this, Timeout.InfiniteTimeSpan, Timeout.InfiniteTimeSpan);
    }

    public TimeProvider Time { get; }

    /// <summary>Waits <paramref name="ticks"/> of <see cref="TimeProvider.TimestampFrequency"/>, or until woken.</summary>
    public ValueTask WaitAsync(long ticks, CancellationToken cancellationToken)
    {
        _core.Reset();
        _token = cancellationToken;
        // A full fence: a waker that runs after this must find the wait armed (see NbdConnection.WakeQosWaiter).
        Interlocked.Exchange(ref _armed, 1);
        _cancellation = cancellationToken.UnsafeRegister(static state => ((QosWaiter)state!).Cancel(), this);
        // Whole milliseconds, rounded up: the timer's own resolution. A wait that ends a little
        // late costs nothing in rate, because the buckets, not the sleeps, keep the count.
        double milliseconds = Math.Ceiling(ticks * 1000.0 / Time.TimestampFrequency);
        _timer.Change(TimeSpan.FromMilliseconds(Math.Max(1, milliseconds)), Timeout.InfiniteTimeSpan);
        return new ValueTask(this, _core.Version);
    }

    /// <summary>Ends the wait in progress, if any (the timer, or a change of the limits).</summary>
    public void Wake()
    {
        if (Interlocked.Exchange(ref _armed, 0) == 1)
        {
            _core.SetResult(true);
        }
    }

    private void Cancel()
    {
        if (Interlocked.Exchange(ref _armed, 0) == 1)
        {
            _core.SetException(new OperationCanceledException(_token));
        }
    }

    public void GetResult(short token)
    {
        _cancellation.Dispose();
        _timer.Change(Timeout.InfiniteTimeSpan, Timeout.InfiniteTimeSpan);
        _core.GetResult(token);
    }

    public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

    public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);

    public void Dispose()
    {
        Cancel();
        _timer.Dispose();
    }
}

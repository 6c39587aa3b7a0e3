namespace NbdServer.Frontend.Server;

/// <summary>
/// A deadline re-armed for each payload or send of one connection, with no allocation per operation.
/// A CancellationTokenSource re-armed with CancelAfter is not enough: when its timer fires between the
/// operation completing and the disarm, the source stays cancelled and the next operation fails as
/// timed out. Here the timer only cancels while armed and past the deadline (checked under the lock the
/// disarm takes), and a source that did fire is replaced by the next <see cref="Arm"/>.
/// Cancelling <c>parent</c> (the connection's abort) cancels the current and every later token.
/// </summary>
internal sealed class Deadline : IDisposable
{
    private readonly CancellationToken _parent;
    private readonly TimeProvider _time;
    private readonly ITimer _timer;
    private readonly CancellationTokenRegistration _parentRegistration;
    private readonly Lock _lock = new();
    private CancellationTokenSource _source = new();
    private bool _armed;
    private bool _expired;
    private long _expiresAt;

    public Deadline(CancellationToken parent, TimeProvider time)
    {
        _parent = parent;
        _time = time;
        _timer = time.CreateTimer(static state => ((Deadline)state!).OnTimer(), this, Timeout.InfiniteTimeSpan, Timeout.InfiniteTimeSpan);
        _parentRegistration = parent.UnsafeRegister(static state => ((Deadline)state!).OnParentCancelled(), this);
    }

    /// <summary>True when the current token was cancelled by the deadline (not by the parent).</summary>
    public bool Expired
    {
        get
        {
            lock (_lock)
            {
                return _expired;
            }
        }
    }

    /// <summary>Starts a deadline <paramref name="timeout"/> from now; returns the token it cancels.</summary>
    public CancellationToken Arm(TimeSpan timeout)
    {
        lock (_lock)
        {
            if (_source.IsCancellationRequested && !_parent.IsCancellationRequested)
            {
                // The previous deadline fired after its operation was done: start from a fresh source.
                _source.Dispose();
                _source = new CancellationTokenSource();
            }
            _expired = false;
            _armed = true;
            _expiresAt = _time.GetTimestamp() + (long)(timeout.TotalSeconds * _time.TimestampFrequency);
            _timer.Change(timeout, Timeout.InfiniteTimeSpan);
            return _source.Token;
        }
    }

    /// <summary>The operation finished: a timer that fires from now on does nothing.</summary>
    public void Disarm()
    {
        lock (_lock)
        {
            _armed = false;
        }
    }

    public void Dispose()
    {
        _parentRegistration.Dispose();
        _timer.Dispose();
        lock (_lock)
        {
            _armed = false;
            _source.Dispose();
        }
    }

    private void OnTimer()
    {
        lock (_lock)
        {
            // A late callback of an earlier arming finds the deadline disarmed or not yet reached.
            if (!_armed || _source.IsCancellationRequested)
            {
                return;
            }
            long now = _time.GetTimestamp();
            if (now < _expiresAt)
            {
                // Timers may run on a coarser clock than the timestamp: never let the deadline slip.
                _timer.Change(_time.GetElapsedTime(now, _expiresAt), Timeout.InfiniteTimeSpan);
                return;
            }
            _armed = false;
            _expired = true;
            // Under the lock, so a concurrent Arm cannot hand out this source and then see it cancelled.
            _source.Cancel();
        }
    }

    private void OnParentCancelled()
    {
        lock (_lock)
        {
            _armed = false;
            _source.Cancel();
        }
    }
}

namespace NbdServer.Frontend.Qos;

/// <summary>Which limits a request counts against.</summary>
internal enum QosDirection
{
    Read,
    Write,
}

/// <summary>
/// One export's QoS: six token buckets (read, write and total; operations and bytes), shared by
/// every connection to the export, so <c>nbd-client -C 4</c> gets the export's limit, not four
/// times it. A request reserves its tokens in every bucket it counts against and waits for the
/// latest of their answers; it is never refused. A connection waits in its own read loop, so a
/// throttled client simply stops being read (TCP backpressure) and nothing queues here.
/// The lock guards a few arithmetic operations per request, and is taken only while a limit is
/// set: with none, <see cref="Active"/> is the whole cost.
/// </summary>
internal sealed class QosLimiter
{
    private const double BytesPerMiB = 1 << 20;

    private readonly Lock _lock = new();
    private readonly TokenBucket _readOps;
    private readonly TokenBucket _writeOps;
    private readonly TokenBucket _totalOps;
    private readonly TokenBucket _readBytes;
    private readonly TokenBucket _writeBytes;
    private readonly TokenBucket _totalBytes;

    // Connections waiting now: woken when the limits change, so a raised or removed limit frees
    // them at once instead of at the time the old limit gave them.
    private readonly HashSet<QosWaiter> _waiting = [];
    private QosLimits _limits = QosLimits.Unlimited;
    private volatile bool _active;
    private long _version;
    private long _throttledRequests;
    private long _throttledTicks;

    public QosLimiter(QosLimits? limits = null, TimeProvider? time = null)
    {
        Time = time ?? TimeProvider.System;
        long frequency = Time.TimestampFrequency;
        _readOps = new TokenBucket(frequency);
        _writeOps = new TokenBucket(frequency);
        _totalOps = new TokenBucket(frequency);
        _readBytes = new TokenBucket(frequency);
        _writeBytes = new TokenBucket(frequency);
        _totalBytes = new TokenBucket(frequency);
        if (limits is not null)
        {
            Set(limits);
        }
    }

    public TimeProvider Time { get; }

    /// <summary>Whether any limit is set; when not, requests skip the limiter entirely.</summary>
    public bool Active => _active;

    public QosLimits Limits => Volatile.Read(ref _limits);

    /// <summary>Requests that had to wait, and their total wait, since start.</summary>
    public long ThrottledRequests => Interlocked.Read(ref _throttledRequests);

    public double ThrottledSeconds => (double)Interlocked.Read(ref _throttledTicks) / Time.TimestampFrequency;

    /// <summary>Connections waiting for a bucket right now (their timers armed).</summary>
    public int Waiting
    {
        get
        {
            lock (_lock)
            {
                return _waiting.Count;
            }
        }
    }

    /// <summary>Replaces the limits (validated by the caller); waiting requests re-reserve under the new ones.</summary>
    public void Set(QosLimits limits)
    {
        lock (_lock)
        {
            long now = Time.GetTimestamp();
            double burst = limits.Burst.TotalSeconds;
            _readOps.Configure(limits.ReadIops, limits.ReadIops * burst, now);
            _writeOps.Configure(limits.WriteIops, limits.WriteIops * burst, now);
            _totalOps.Configure(limits.TotalIops, limits.TotalIops * burst, now);
            _readBytes.Configure(limits.ReadMbps * BytesPerMiB, limits.ReadMbps * BytesPerMiB * burst, now);
            _writeBytes.Configure(limits.WriteMbps * BytesPerMiB, limits.WriteMbps * BytesPerMiB * burst, now);
            _totalBytes.Configure(limits.TotalMbps * BytesPerMiB, limits.TotalMbps * BytesPerMiB * burst, now);
            Volatile.Write(ref _limits, limits);
            _active = !limits.IsUnlimited;
            _version++;
            foreach (QosWaiter waiter in _waiting)
            {
                waiter.Wake();
            }
        }
    }

    /// <summary>Takes the request's tokens if it may go now (the request loop's batch path never waits); false takes nothing.</summary>
    public bool TryGoNow(QosDirection direction, long bytes)
    {
        lock (_lock)
        {
            long now = Time.GetTimestamp();
            (TokenBucket ops, TokenBucket data) = Buckets(direction);
            if (!ops.CanGoNow(1, now) || !_totalOps.CanGoNow(1, now)
                || (bytes > 0 && (!data.CanGoNow(bytes, now) || !_totalBytes.CanGoNow(bytes, now))))
            {
                return false;
            }
            ReserveLocked(direction, bytes, now);
            return true;
        }
    }

    /// <summary>Reserves the request's tokens; answers the ticks to wait (0: go now) and the limits' version they were reserved under.</summary>
    public long Reserve(QosDirection direction, long bytes, out long version)
    {
        lock (_lock)
        {
            long wait = ReserveLocked(direction, bytes, Time.GetTimestamp());
            version = _version;
            return wait;
        }
    }

    /// <summary>
    /// Registers an armed waiter to be woken by a change of the limits; true if they already changed
    /// since <paramref name="version"/> (the waiter must not sleep on the old ones).
    /// </summary>
    public bool Register(QosWaiter waiter, long version)
    {
        lock (_lock)
        {
            _waiting.Add(waiter);
            return _version != version;
        }
    }

    /// <summary>Gives back what <see cref="TryGoNow"/> took for a request that did not go after all.</summary>
    public void Refund(QosDirection direction, long bytes)
    {
        lock (_lock)
        {
            RefundLocked(direction, bytes, Time.GetTimestamp());
        }
    }

    /// <summary>The limits changed while the request waited: gives back its tokens and reserves again under the new ones.</summary>
    public long Rereserve(QosDirection direction, long bytes, ref long version)
    {
        lock (_lock)
        {
            long now = Time.GetTimestamp();
            RefundLocked(direction, bytes, now);
            long wait = ReserveLocked(direction, bytes, now);
            version = _version;
            return wait;
        }
    }

    /// <summary>True when the limits changed since <paramref name="version"/>.</summary>
    public bool Changed(long version)
    {
        lock (_lock)
        {
            return _version != version;
        }
    }

    /// <summary>The request waited <paramref name="ticks"/> and goes now.</summary>
    public void Done(QosWaiter waiter, long ticks)
    {
        lock (_lock)
        {
            _waiting.Remove(waiter);
        }
        Interlocked.Increment(ref _throttledRequests);
        Interlocked.Add(ref _throttledTicks, ticks);
    }

    private void RefundLocked(QosDirection direction, long bytes, long now)
    {
        (TokenBucket ops, TokenBucket data) = Buckets(direction);
        ops.Refund(1, now);
        _totalOps.Refund(1, now);
        if (bytes > 0)
        {
            data.Refund(bytes, now);
            _totalBytes.Refund(bytes, now);
        }
    }

    private long ReserveLocked(QosDirection direction, long bytes, long now)
    {
        (TokenBucket ops, TokenBucket data) = Buckets(direction);
        long wait = Math.Max(ops.Reserve(1, now), _totalOps.Reserve(1, now));
        if (bytes > 0)
        {
            wait = Math.Max(wait, Math.Max(data.Reserve(bytes, now), _totalBytes.Reserve(bytes, now)));
        }
        return wait;
    }

    private (TokenBucket Ops, TokenBucket Bytes) Buckets(QosDirection direction) =>
        direction == QosDirection.Read ? (_readOps, _readBytes) : (_writeOps, _writeBytes);
}

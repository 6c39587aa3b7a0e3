namespace NbdServer.ReplicaEngine;

/// <summary>
/// The pace of background copies as the operator set it: a rate limit per repaired replica and the
/// duty cycle kept while the guest does IO. Read by the workers at every step, so a change made on
/// the control socket takes effect within one chunk.
/// </summary>
internal sealed class RepairPace(EngineOptions options)
{
    private double _rateLimit = options.RepairRateLimit;
    private double _dutyCycle = options.RepairDutyCycle;

    /// <summary>MiB/s one replica's repair may copy (0: no limit).</summary>
    public double RateLimit
    {
        get => Volatile.Read(ref _rateLimit);
        set => Volatile.Write(ref _rateLimit, value);
    }

    /// <summary>Share of the time a repair keeps busy while the guest does IO, in (0, 1].</summary>
    public double DutyCycle
    {
        get => Volatile.Read(ref _dutyCycle);
        set => Volatile.Write(ref _dutyCycle, value);
    }

    /// <summary>Checks and applies a change (null: unchanged); the message names what is wrong.</summary>
    public string? TrySet(double? rateLimit, double? dutyCycle)
    {
        if (rateLimit is { } rate && (double.IsNaN(rate) || rate is < 0 or > 1_000_000))
        {
            return $"rate limit must be 0 (none) to 1000000 MiB/s; got {rate}";
        }
        if (dutyCycle is { } duty && (double.IsNaN(duty) || duty is <= 0 or > 1))
        {
            return $"duty cycle must be in (0, 1]; got {duty}";
        }
        if (rateLimit is { } r)
        {
            RateLimit = r;
        }
        if (dutyCycle is { } d)
        {
            DutyCycle = d;
        }
        return null;
    }
}

/// <summary>
/// The rate limit of one repair, shared by its parallel copies: each chunk reserves its share of
/// the time line (bytes / rate) and waits until its slot begins. Without a limit it never waits.
/// A slot never starts more than a second in the past: an idle spell earns at most a second's burst.
/// </summary>
internal sealed class RepairThrottle(Engine engine)
{
    private readonly Lock _lock = new(); // taken by the copies of one repair only, for a few instructions
    private long _nextSlot;

    public async ValueTask TakeAsync(long bytes, CancellationToken cancellationToken)
    {
        double mibPerSecond = engine.Pace.RateLimit;
        if (mibPerSecond <= 0)
        {
            return;
        }
        TimeProvider time = engine.Time;
        long cost = (long)(bytes / (mibPerSecond * 1048576.0) * time.TimestampFrequency);
        long now = time.GetTimestamp();
        long start;
        lock (_lock)
        {
            start = Math.Max(_nextSlot, now - time.TimestampFrequency);
            _nextSlot = start + cost;
        }
        if (start > now)
        {
            await Task.Delay(time.GetElapsedTime(now, start), time, cancellationToken);
        }
    }
}

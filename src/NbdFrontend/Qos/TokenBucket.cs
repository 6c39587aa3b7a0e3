namespace NbdServer.Frontend.Qos;

/// <summary>
/// A token bucket that answers "when may this go?" instead of "may this go now?": it fills at
/// <see cref="Rate"/> tokens a second up to <see cref="Burst"/>, and a request of cost <c>c</c> goes
/// once the level (before its own charge) reaches <c>min(c, Burst)</c>. The charge is taken at once
/// (a reservation), so the level goes negative while requests wait: each later request finds the
/// earlier ones' cost already taken and is told a later time. A request larger than the burst still
/// goes (when the bucket is full) and borrows the rest, so no size of IO can wait forever.
/// Not thread-safe: its owner (<see cref="QosLimiter"/>) serialises the calls.
/// </summary>
internal sealed class TokenBucket(long timestampFrequency)
{
    private double _level;
    private long _updated;

    /// <summary>Tokens per second; 0 is no limit (the bucket is then never consulted).</summary>
    public double Rate { get; private set; }

    /// <summary>Most tokens the bucket holds: what an idle client may spend at once.</summary>
    public double Burst { get; private set; }

    public bool Limited => Rate > 0;

    /// <summary>
    /// Sets the rate and burst. From no limit the bucket starts full; otherwise its level (and any
    /// debt) is kept, capped at the new burst, so a change never forgives borrowed tokens.
    /// </summary>
    public void Configure(double rate, double burst, long now)
    {
        if (!Limited)
        {
            _level = burst;
        }
        else
        {
            Refill(now);
            _level = Math.Min(_level, burst);
        }
        _updated = now;
        Rate = rate;
        Burst = burst;
    }

    /// <summary>The level at <paramref name="now"/> (negative: tokens borrowed by requests granted or waiting).</summary>
    public double Level(long now)
    {
        Refill(now);
        return _level;
    }

    /// <summary>Takes <paramref name="cost"/> tokens; answers the ticks (of the timestamp frequency) to wait before going.</summary>
    public long Reserve(double cost, long now)
    {
        if (!Limited)
        {
            return 0;
        }
        Refill(now);
        double need = Math.Min(cost, Burst);
        long wait = _level >= need ? 0 : (long)Math.Ceiling((need - _level) / Rate * timestampFrequency);
        _level -= cost;
        return wait;
    }

    /// <summary>Whether <paramref name="cost"/> could go now, without taking anything.</summary>
    public bool CanGoNow(double cost, long now)
    {
        if (!Limited)
        {
            return true;
        }
        Refill(now);
        return _level >= Math.Min(cost, Burst);
    }

    /// <summary>Gives back a reservation (its request will reserve again under new limits).</summary>
    public void Refund(double cost, long now)
    {
        if (!Limited)
        {
            return;
        }
        Refill(now);
        _level = Math.Min(Burst, _level + cost);
    }

    private void Refill(long now)
    {
        long elapsed = now - _updated;
        if (elapsed <= 0)
        {
            return;
        }
        _updated = now;
        _level = Math.Min(Burst, _level + (Rate * elapsed / timestampFrequency));
    }
}

using System.Diagnostics;
using System.Globalization;
using System.Text;

namespace NbdServer.Tools.Verify;

/// <summary>
/// Per-second figures: IOs completed, errors, and the longest single-IO latency of the IOs that
/// completed in that second — and the age of the oldest IO still outstanding, so a stall shows
/// while it happens, not only when the stuck request finally returns.
/// </summary>
internal sealed class IoStats
{
    private long _ios;
    private long _reads;
    private long _writes;
    private long _flushes;
    private long _errors;
    private long _maxLatencyTicks;
    private readonly long[] _startedAt;

    public long TotalIos;
    public long TotalErrors;
    public long MaxLatencyTicksEver;
    public long MinIosPerSecond = long.MaxValue;
    public int Seconds;

    public IoStats(int slots) => _startedAt = new long[slots];

    public void Started(int slot) => Volatile.Write(ref _startedAt[slot], Stopwatch.GetTimestamp());

    public void Completed(int slot, char kind, bool error)
    {
        long started = Volatile.Read(ref _startedAt[slot]);
        Volatile.Write(ref _startedAt[slot], 0);
        long latency = Stopwatch.GetTimestamp() - started;
        Interlocked.Increment(ref _ios);
        switch (kind)
        {
            case 'r':
                Interlocked.Increment(ref _reads);
                break;
            case 'w':
                Interlocked.Increment(ref _writes);
                break;
            default:
                Interlocked.Increment(ref _flushes);
                break;
        }
        if (error)
        {
            Interlocked.Increment(ref _errors);
        }
        long seen = Volatile.Read(ref _maxLatencyTicks);
        while (latency > seen)
        {
            long was = Interlocked.CompareExchange(ref _maxLatencyTicks, latency, seen);
            if (was == seen)
            {
                break;
            }
            seen = was;
        }
    }

    /// <summary>Ends one second of figures and formats its line.</summary>
    public string Tick(bool json, bool countInMinimum)
    {
        long ios = Interlocked.Exchange(ref _ios, 0);
        long reads = Interlocked.Exchange(ref _reads, 0);
        long writes = Interlocked.Exchange(ref _writes, 0);
        long flushes = Interlocked.Exchange(ref _flushes, 0);
        long errors = Interlocked.Exchange(ref _errors, 0);
        long maxTicks = Interlocked.Exchange(ref _maxLatencyTicks, 0);
        long now = Stopwatch.GetTimestamp();
        long oldest = 0;
        foreach (ref long s in _startedAt.AsSpan())
        {
            long v = Volatile.Read(ref s);
            if (v != 0 && now - v > oldest)
            {
                oldest = now - v;
            }
        }
        // An IO still stuck is at least that slow: it counts toward the worst latency now.
        long worst = Math.Max(maxTicks, oldest);
        Seconds++;
        TotalIos += ios;
        TotalErrors += errors;
        MaxLatencyTicksEver = Math.Max(MaxLatencyTicksEver, worst);
        if (countInMinimum)
        {
            MinIosPerSecond = Math.Min(MinIosPerSecond, ios);
        }
        double epoch = DateTimeOffset.UtcNow.ToUnixTimeMilliseconds() / 1000.0;
        var c = CultureInfo.InvariantCulture;
        var sb = new StringBuilder();
        if (json)
        {
            sb.Append(c, $"{{\"t\":{Seconds},\"epoch\":{epoch:F3},\"ios\":{ios},\"reads\":{reads},\"writes\":{writes},\"flushes\":{flushes},\"errors\":{errors},\"max_lat_ms\":{Ms(maxTicks):F1},\"oldest_ms\":{Ms(oldest):F1}}}");
        }
        else
        {
            sb.Append(c, $"verify: t={Seconds} epoch={epoch:F3} ios={ios} reads={reads} writes={writes} flushes={flushes} errors={errors} max_lat_ms={Ms(maxTicks):F1} oldest_ms={Ms(oldest):F1}");
        }
        return sb.ToString();
    }

    public static double Ms(long ticks) => ticks * 1000.0 / Stopwatch.Frequency;
}

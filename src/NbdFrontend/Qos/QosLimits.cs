using System.Globalization;

namespace NbdServer.Frontend.Qos;

/// <summary>
/// One export's QoS limits as the operator gives them: operations and MiB per second for reads,
/// writes and both together (0: no limit), and the burst, in seconds of each limit, that an idle
/// client may spend at once. The same names serve the config (<c>--qos-read-iops</c>), the control
/// socket (<c>POST /qos?read-iops=</c>) and <c>nbd-server qos set --read-iops</c>.
/// </summary>
internal sealed record QosLimits
{
    /// <summary>Upper bound of an IOPS limit: far above what one export can do, low enough that a typo is caught.</summary>
    public const double MaxIops = 100_000_000;

    /// <summary>Upper bound of a bandwidth limit in MiB/s (1 TiB/s).</summary>
    public const double MaxMbps = 1 << 20;

    /// <summary>Burst bounds: at least a millisecond of the rate, at most an hour of it.</summary>
    public static readonly TimeSpan MinBurst = TimeSpan.FromMilliseconds(1);

    public static readonly TimeSpan MaxBurst = TimeSpan.FromHours(1);

    public static readonly TimeSpan DefaultBurst = TimeSpan.FromSeconds(1);

    public const string ReadIopsKey = "read-iops";
    public const string WriteIopsKey = "write-iops";
    public const string TotalIopsKey = "total-iops";
    public const string ReadMbpsKey = "read-mbps";
    public const string WriteMbpsKey = "write-mbps";
    public const string TotalMbpsKey = "total-mbps";
    public const string BurstKey = "burst";

    /// <summary>The keys in the order they are shown.</summary>
    public static readonly IReadOnlyList<string> Keys = [ReadIopsKey, WriteIopsKey, TotalIopsKey, ReadMbpsKey, WriteMbpsKey, TotalMbpsKey, BurstKey];

    public static readonly QosLimits Unlimited = new();

    public double ReadIops { get; init; }

    public double WriteIops { get; init; }

    public double TotalIops { get; init; }

    public double ReadMbps { get; init; }

    public double WriteMbps { get; init; }

    public double TotalMbps { get; init; }

    public TimeSpan Burst { get; init; } = DefaultBurst;

    public bool IsUnlimited => ReadIops == 0 && WriteIops == 0 && TotalIops == 0 && ReadMbps == 0 && WriteMbps == 0 && TotalMbps == 0;

    /// <summary>Why these limits cannot be used (naming the key, or what <paramref name="name"/> makes of it), or null.</summary>
    public string? Validate(Func<string, string>? name = null)
    {
        string? error = ValidateKeys();
        if (error is null || name is null)
        {
            return error;
        }
        string key = error[..error.IndexOf(' ', StringComparison.Ordinal)];
        return name(key) + error[key.Length..];
    }

    private string? ValidateKeys()
    {
        foreach ((string key, double value) in new[] { (ReadIopsKey, ReadIops), (WriteIopsKey, WriteIops), (TotalIopsKey, TotalIops) })
        {
            if (!double.IsFinite(value) || value is < 0 or > MaxIops)
            {
                return string.Create(CultureInfo.InvariantCulture, $"{key} must be 0 (no limit) to {MaxIops:0} operations per second; got {value}");
            }
        }
        foreach ((string key, double value) in new[] { (ReadMbpsKey, ReadMbps), (WriteMbpsKey, WriteMbps), (TotalMbpsKey, TotalMbps) })
        {
            if (!double.IsFinite(value) || value is < 0 or > MaxMbps)
            {
                return string.Create(CultureInfo.InvariantCulture, $"{key} must be 0 (no limit) to {MaxMbps:0} MiB/s; got {value}");
            }
        }
        if (Burst < MinBurst || Burst > MaxBurst)
        {
            return string.Create(CultureInfo.InvariantCulture, $"{BurstKey} must be {MinBurst.TotalSeconds:0.###} to {MaxBurst.TotalSeconds:0} seconds; got {Burst.TotalSeconds}");
        }
        return null;
    }

    /// <summary>The value of <paramref name="key"/> (the burst in seconds).</summary>
    public double Get(string key) => key switch
    {
        ReadIopsKey => ReadIops,
        WriteIopsKey => WriteIops,
        TotalIopsKey => TotalIops,
        ReadMbpsKey => ReadMbps,
        WriteMbpsKey => WriteMbps,
        TotalMbpsKey => TotalMbps,
        BurstKey => Burst.TotalSeconds,
        _ => throw new ArgumentOutOfRangeException(nameof(key), key, "not a QoS setting"),
    };

    /// <summary>These limits with <paramref name="key"/> set to <paramref name="value"/> (the burst in seconds); not validated.</summary>
    public QosLimits With(string key, double value) => key switch
    {
        ReadIopsKey => this with { ReadIops = value },
        WriteIopsKey => this with { WriteIops = value },
        TotalIopsKey => this with { TotalIops = value },
        ReadMbpsKey => this with { ReadMbps = value },
        WriteMbpsKey => this with { WriteMbps = value },
        TotalMbpsKey => this with { TotalMbps = value },
        BurstKey => this with { Burst = TimeSpan.FromSeconds(value) },
        _ => throw new ArgumentOutOfRangeException(nameof(key), key, "not a QoS setting"),
    };

    /// <summary>One line for logs and the status table: "read 500 IOPS, write 20 MiB/s, burst 1 s" or "no limit".</summary>
    public override string ToString()
    {
        if (IsUnlimited)
        {
            return "no limit";
        }
        var parts = new List<string>();
        CultureInfo c = CultureInfo.InvariantCulture;
        foreach ((string name, double iops, double mbps) in new[] { ("read", ReadIops, ReadMbps), ("write", WriteIops, WriteMbps), ("total", TotalIops, TotalMbps) })
        {
            if (iops > 0)
            {
                parts.Add(string.Create(c, $"{name} {iops:0.##} IOPS"));
            }
            if (mbps > 0)
            {
                parts.Add(string.Create(c, $"{name} {mbps:0.##} MiB/s"));
            }
        }
        parts.Add(string.Create(c, $"burst {Burst.TotalSeconds:0.###} s"));
        return string.Join(", ", parts);
    }

    /// <summary>
    /// Parses a change given as <c>key=value</c> pairs (the control socket's query) on top of
    /// <paramref name="current"/>: every key at most once, each a plain non-negative number, the
    /// result valid. Answers the new limits, or null and why not (then nothing is to change).
    /// </summary>
    public static QosLimits? TryParseChange(QosLimits current, IEnumerable<(string Key, string Value)> pairs, out string? error)
    {
        var seen = new HashSet<string>(StringComparer.Ordinal);
        QosLimits next = current;
        foreach ((string key, string text) in pairs)
        {
            if (!Keys.Contains(key) || !seen.Add(key))
            {
                error = $"'{key}' is not a QoS setting (or given twice); use {string.Join(", ", Keys)}";
                return null;
            }
            if (!double.TryParse(text, NumberStyles.AllowDecimalPoint, CultureInfo.InvariantCulture, out double value) || !double.IsFinite(value))
            {
                error = $"{key}: '{text}' is not a number (0 or more)";
                return null;
            }
            if (key == BurstKey && value > MaxBurst.TotalSeconds)
            {
                // Refused before it becomes a TimeSpan, so the message shows the value given.
                error = string.Create(CultureInfo.InvariantCulture, $"{BurstKey} must be {MinBurst.TotalSeconds:0.###} to {MaxBurst.TotalSeconds:0} seconds; got {text}");
                return null;
            }
            next = next.With(key, value);
        }
        if (seen.Count == 0)
        {
            error = $"nothing to set; give one or more of {string.Join(", ", Keys.Select(k => k + "=N"))}";
            return null;
        }
        error = next.Validate();
        return error is null ? next : null;
    }
}

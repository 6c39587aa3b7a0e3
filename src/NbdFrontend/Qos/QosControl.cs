using Microsoft.Extensions.Logging;

namespace NbdServer.Frontend.Qos;

/// <summary>One export's QoS as the control socket shows it (<c>GET /qos</c>, <c>nbd-server qos</c>).</summary>
internal sealed record QosStatus(string Export, double ReadIops, double WriteIops, double TotalIops, double ReadMbps, double WriteMbps, double TotalMbps,
    double BurstSeconds, long ThrottledRequests, double ThrottledSeconds, int Waiting)
{
    public QosLimits Limits => new()
    {
        ReadIops = ReadIops,
        WriteIops = WriteIops,
        TotalIops = TotalIops,
        ReadMbps = ReadMbps,
        WriteMbps = WriteMbps,
        TotalMbps = TotalMbps,
        Burst = TimeSpan.FromSeconds(BurstSeconds),
    };
}

/// <summary>The answer of <c>GET /qos</c> and <c>POST /qos</c>: every export's QoS.</summary>
internal sealed record QosReport(QosStatus[] Exports);

/// <summary>
/// The live side of QoS for the control socket: reports every export's limits and counts, and
/// applies a change given as the query of <c>POST /qos?export=NAME&amp;read-iops=N&amp;...</c>
/// (export: the first one when not given). A change is all or nothing and logged once; it lasts
/// until the server restarts or reloads (the config's <c>qos-*</c> settings are what a start applies).
/// </summary>
internal sealed class QosControl(IReadOnlyList<(string Export, QosLimiter Limiter)> exports, ILogger logger)
{
    public const string ExportKey = "export";

    private readonly Lock _changes = new();

    public QosReport Report() => new([.. exports.Select(e => Status(e.Export, e.Limiter))]);

    /// <summary>Applies the change in <paramref name="query"/>; answers why it was refused (nothing changed), or null.</summary>
    public string? Set(string query)
    {
        var pairs = new List<(string Key, string Value)>();
        string? export = null;
        foreach (string pair in query.Split('&', StringSplitOptions.RemoveEmptyEntries))
        {
            string[] kv = pair.Split('=', 2);
            string key = Uri.UnescapeDataString(kv[0]);
            string value = kv.Length == 2 ? Uri.UnescapeDataString(kv[1]) : "";
            if (key == ExportKey)
            {
                if (export is not null)
                {
                    return $"'{ExportKey}' is given twice";
                }
                export = value;
                continue;
            }
            pairs.Add((key, value));
        }
        (string name, QosLimiter limiter) = export is null ? exports[0] : exports.FirstOrDefault(e => e.Export == export);
        if (limiter is null)
        {
            return $"no export '{export}' (exports: {string.Join(", ", exports.Select(e => e.Export))})";
        }
        // Under a lock so two changes at once cannot each apply on top of the old limits and lose one.
        lock (_changes)
        {
            QosLimits? next = QosLimits.TryParseChange(limiter.Limits, pairs, out string? error);
            if (next is null)
            {
                return error;
            }
            limiter.Set(next);
            QosLog.Set(logger, name, next.ToString());
        }
        return null;
    }

    private static QosStatus Status(string export, QosLimiter limiter)
    {
        QosLimits l = limiter.Limits;
        return new QosStatus(export, l.ReadIops, l.WriteIops, l.TotalIops, l.ReadMbps, l.WriteMbps, l.TotalMbps, l.Burst.TotalSeconds,
            limiter.ThrottledRequests, limiter.ThrottledSeconds, limiter.Waiting);
    }
}

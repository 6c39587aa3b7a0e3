using System.Diagnostics.Metrics;
using System.Runtime.CompilerServices;
using NbdServer.Frontend.Server;

namespace NbdServer.Frontend.Qos;

/// <summary>
/// QoS as instruments of the frontend's meter: each export's limits (0: none) as gauges, and the
/// requests that waited and their total wait as counters. Exporters read them at scrape time from
/// the limiters themselves, so the request path records nothing extra.
/// </summary>
internal static class QosMetrics
{
    private static readonly Meter Meter = new(FrontendMetrics.MeterName);

    // Weak: an export's limiter is reported while its export lives (tests build many).
    private static readonly ConditionalWeakTable<QosLimiter, string> Limiters = [];

    static QosMetrics()
    {
        // Names carry their unit so every exporter spells them alike:
        // nbd_frontend_qos_iops_limit, nbd_frontend_qos_bandwidth_limit_bytes_per_second,
        // nbd_frontend_qos_throttled_requests_total, nbd_frontend_qos_throttled_seconds_total.
        Meter.CreateObservableGauge("nbd.frontend.qos.iops_limit", () => PerDirection(l => (l.ReadIops, l.WriteIops, l.TotalIops)), null,
            "The export's IOPS limit (read, write, total); 0: no limit");
        Meter.CreateObservableGauge("nbd.frontend.qos.bandwidth_limit_bytes_per_second", () => PerDirection(l => (l.ReadMbps * (1 << 20), l.WriteMbps * (1 << 20), l.TotalMbps * (1 << 20))), null,
            "The export's bandwidth limit in bytes per second (read, write, total); 0: no limit");
        Meter.CreateObservableCounter("nbd.frontend.qos.throttled_requests", () => PerExport(q => q.ThrottledRequests), "{request}",
            "Requests that waited for the export's QoS limits");
        Meter.CreateObservableCounter("nbd.frontend.qos.throttled_seconds", () => PerExport(q => q.ThrottledSeconds), null,
            "Time requests spent waiting for the export's QoS limits (summed over requests)");
    }

    /// <summary>Reports <paramref name="limiter"/> under the export's name while it lives.</summary>
    public static void Track(string export, QosLimiter limiter) => Limiters.AddOrUpdate(limiter, export);

    private static IEnumerable<Measurement<double>> PerDirection(Func<QosLimits, (double Read, double Write, double Total)> select)
    {
        foreach ((QosLimiter limiter, string export) in Limiters)
        {
            (double read, double write, double total) = select(limiter.Limits);
            yield return new Measurement<double>(read, new("export", export), new("direction", "read"));
            yield return new Measurement<double>(write, new("export", export), new("direction", "write"));
            yield return new Measurement<double>(total, new("export", export), new("direction", "total"));
        }
    }

    private static IEnumerable<Measurement<T>> PerExport<T>(Func<QosLimiter, T> select) where T : struct
    {
        foreach ((QosLimiter limiter, string export) in Limiters)
        {
            yield return new Measurement<T>(select(limiter), new KeyValuePair<string, object?>("export", export));
        }
    }
}

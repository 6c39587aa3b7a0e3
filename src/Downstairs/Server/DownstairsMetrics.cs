using System.Diagnostics;
using System.Diagnostics.Metrics;
using NbdServer.Protocol;

namespace NbdServer.Downstairs.Server;

/// <summary>
/// The downstairs' job path as <see cref="System.Diagnostics.Metrics"/> instruments (meter
/// "NbdServer.Downstairs"): jobs and failed jobs by op, bytes moved, time from a job's arrival to its
/// reply (queueing behind overlapping jobs and barriers included), and upstairs connections.
/// <c>--metrics ADDR:PORT</c> serves them to Prometheus; <c>dotnet-counters monitor -n nbd-downstairs
/// --counters NbdServer.Downstairs</c> shows them live.
/// </summary>
internal static class DownstairsMetrics
{
    public const string MeterName = "NbdServer.Downstairs";

    private static readonly Meter Meter = new(MeterName);
    private static readonly Counter<long> Jobs = Meter.CreateCounter<long>("nbd.downstairs.jobs", "{job}", "Jobs answered, by op");
    private static readonly Counter<long> Failed = Meter.CreateCounter<long>("nbd.downstairs.errors", "{job}", "Jobs answered with an error (full disk, EIO, fenced…), by op");
    private static readonly Counter<long> Bytes = Meter.CreateCounter<long>("nbd.downstairs.bytes", "By", "Block bytes read or written, by op (repair copies included)");
    private static readonly Histogram<double> Duration = Meter.CreateHistogram<double>("nbd.downstairs.job.duration", "s", "Time from a job's arrival to its reply, by op");
    private static readonly UpDownCounter<long> Connections = Meter.CreateUpDownCounter<long>("nbd.downstairs.connections", "{connection}", "Upstairs connections past Hello");

    // One interned tag per message type: no per-job string or boxing.
    private static readonly Dictionary<MessageType, KeyValuePair<string, object?>> OpTags = new()
    {
        [MessageType.Write] = new("op", "write"),
        [MessageType.Read] = new("op", "read"),
        [MessageType.Flush] = new("op", "flush"),
        [MessageType.ExtentRead] = new("op", "repair_read"),
        [MessageType.ExtentWrite] = new("op", "repair_write"),
        [MessageType.ExtentCommit] = new("op", "repair_commit"),
        [MessageType.ExtentsPending] = new("op", "repair_pending"),
    };

    private static readonly KeyValuePair<string, object?> OtherTag = new("op", "other");

    /// <summary>One answered job; <paramref name="arrived"/> is a <see cref="Stopwatch.GetTimestamp"/>.</summary>
    public static void Record(MessageType op, bool ok, long bytes, long arrived)
    {
        KeyValuePair<string, object?> tag = OpTags.GetValueOrDefault(op, OtherTag);
        Jobs.Add(1, tag);
        if (!ok)
        {
            Failed.Add(1, tag);
        }
        else if (bytes > 0)
        {
            Bytes.Add(bytes, tag);
        }
        if (Duration.Enabled)
        {
            Duration.Record(Stopwatch.GetElapsedTime(arrived).TotalSeconds, tag);
        }
    }

    public static void ConnectionOpened() => Connections.Add(1);

    public static void ConnectionClosed() => Connections.Add(-1);
}

using System.Diagnostics;
using System.Diagnostics.Metrics;
using NbdServer.Nbd;

namespace NbdServer.Frontend.Server;

/// <summary>
/// The NBD request path as <see cref="System.Diagnostics.Metrics"/> instruments (meter
/// "NbdServer.Frontend"): requests and errors by command, bytes read and written, latency.
/// With no listener attached each call is a few enabled-checks; <c>dotnet-counters monitor
/// -n nbd-server --counters NbdServer.Frontend</c> or <c>--metrics</c> attach one.
/// </summary>
internal static class FrontendMetrics
{
    public const string MeterName = "NbdServer.Frontend";

    private static readonly Meter Meter = new(MeterName);
    private static readonly Counter<long> Requests = Meter.CreateCounter<long>("nbd.frontend.requests", "{request}", "NBD requests answered, by command");
    private static readonly Counter<long> Errors = Meter.CreateCounter<long>("nbd.frontend.errors", "{request}", "NBD requests answered with an error, by command");
    private static readonly Counter<long> BytesRead = Meter.CreateCounter<long>("nbd.frontend.read", "By", "Bytes read by clients");
    private static readonly Counter<long> BytesWritten = Meter.CreateCounter<long>("nbd.frontend.written", "By", "Bytes written by clients (WRITE payload)");
    private static readonly Histogram<double> Duration = Meter.CreateHistogram<double>("nbd.frontend.request.duration", "s", "Time from a request's arrival to its reply being queued, by command");
    private static readonly UpDownCounter<long> Connections = Meter.CreateUpDownCounter<long>("nbd.frontend.connections", "{connection}", "Clients in the transmission phase");

    // Interned tag values: no per-request string or boxing.
    private static readonly KeyValuePair<string, object?>[] CommandTags =
        [.. Enum.GetValues<NbdCommand>().Select(c => new KeyValuePair<string, object?>("command", c switch
        {
            NbdCommand.Read => "read",
            NbdCommand.Write => "write",
            NbdCommand.Flush => "flush",
            NbdCommand.Trim => "trim",
            NbdCommand.Cache => "cache",
            NbdCommand.WriteZeroes => "write_zeroes",
            NbdCommand.BlockStatus => "block_status",
            _ => "other",
        }))];

    private static readonly KeyValuePair<string, object?> OtherTag = new("command", "other");

    /// <summary>One answered request; <paramref name="started"/> is a <see cref="Stopwatch.GetTimestamp"/>.</summary>
    public static void Record(NbdCommand command, uint length, bool ok, long started)
    {
        KeyValuePair<string, object?> tag = (int)command < CommandTags.Length ? CommandTags[(int)command] : OtherTag;
        Requests.Add(1, tag);
        if (!ok)
        {
            Errors.Add(1, tag);
        }
        else if (command == NbdCommand.Read)
        {
            BytesRead.Add(length);
        }
        else if (command == NbdCommand.Write)
        {
            BytesWritten.Add(length);
        }
        if (Duration.Enabled)
        {
            Duration.Record(Stopwatch.GetElapsedTime(started).TotalSeconds, tag);
        }
    }

    public static void ConnectionAttached() => Connections.Add(1);

    public static void ConnectionDetached() => Connections.Add(-1);
}

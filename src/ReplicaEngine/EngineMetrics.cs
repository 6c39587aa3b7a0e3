using System.Diagnostics.Metrics;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The engine's counters as <see cref="System.Diagnostics.Metrics"/> instruments (meter
/// "NbdServer.ReplicaEngine"), observable with dotnet-counters or any OpenTelemetry exporter.
/// </summary>
public sealed class EngineMetrics : IDisposable
{
    public const string MeterName = "NbdServer.ReplicaEngine";

    private readonly Meter _meter = new(MeterName);

    public EngineMetrics(ReplicatedVolume volume)
    {
        IEnumerable<Measurement<T>> PerReplica<T>(Func<ReplicaStatus, T> value) where T : struct =>
            volume.GetStatus().Replicas.Select(r => new Measurement<T>(value(r), new KeyValuePair<string, object?>("replica", r.Index)));

        _meter.CreateObservableGauge("nbd.replica.outstanding_jobs", () => PerReplica(r => r.OutstandingJobs), "{job}", "Jobs sent to the replica and not yet answered");
        _meter.CreateObservableGauge("nbd.replica.outstanding_bytes", () => PerReplica(r => r.OutstandingBytes), "By", "Payload bytes sent to the replica and not yet answered");
        _meter.CreateObservableCounter("nbd.replica.jobs_completed", () => PerReplica(r => r.Completed), "{job}", "Jobs the replica completed");
        _meter.CreateObservableCounter("nbd.replica.errors", () => PerReplica(r => r.Errors), "{error}", "Failed jobs and bad blocks");
        _meter.CreateObservableCounter("nbd.replica.faults", () => PerReplica(r => r.Faults), "{fault}", "Times the replica was taken out of service");
        _meter.CreateObservableGauge("nbd.replica.state", () => PerReplica(r => (int)r.State), null, "0 connecting, 1 active, 2 repairing, 3 faulted");
        _meter.CreateObservableGauge("nbd.replica.repair_remaining", () => PerReplica(r => r.RepairTotal - r.RepairDone), "{extent}", "Extents left to live-repair");
        _meter.CreateObservableCounter("nbd.replica.repair_bytes", () => PerReplica(r => r.RepairBytesCopied), "By", "Bytes live repair copied to the replica");
        _meter.CreateObservableCounter("nbd.replica.repair_duration", () => PerReplica(r => r.RepairSeconds), "s", "Time spent live-repairing the replica");
        _meter.CreateObservableGauge("nbd.replica.repair_remaining_bytes", () => PerReplica(r => Math.Max(0, r.RepairBytesTotal - r.RepairBytesDone)), "By", "Bytes the running repair still expects to copy");
        _meter.CreateObservableGauge("nbd.replica.change_record_bytes", () => PerReplica(r => r.ChangeRecordBytes ?? 0), "By", "Bytes the replica's changed-block record marks (what it missed while out)");
        _meter.CreateObservableGauge("nbd.volume.replicas_in_service", () => volume.GetStatus().InService, "{replica}");
        _meter.CreateObservableCounter("nbd.volume.scrub_checked_blocks", () => volume.ScrubTotals.Checked, "{block}", "Block copies scrubs checked against their stored hash");
        _meter.CreateObservableCounter("nbd.volume.scrub_repaired_blocks", () => volume.ScrubTotals.Repaired, "{block}", "Bad block copies scrubs found and rewrote from a good one");
    }

    public void Dispose() => _meter.Dispose();
}

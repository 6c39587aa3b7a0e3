using Microsoft.Extensions.Logging;

namespace NbdServer.ReplicaEngine;

/// <summary>Source-generated log lines of the replica engine (stable event ids: 3xxx).</summary>
internal static partial class EngineLog
{
    [LoggerMessage(EventId = 3000, Level = LogLevel.Information, Message = "Replica {Replica} ({EndPoint}) connected: region {Region}, {Extents} extents of {ExtentBytes} bytes, block {BlockSize}")]
    public static partial void Connected(ILogger logger, int replica, string endPoint, Guid region, int extents, long extentBytes, int blockSize);

    [LoggerMessage(EventId = 3001, Level = LogLevel.Warning, Message = "Replica {Replica} ({EndPoint}) FAULTED: {Reason}; {Jobs} outstanding jobs ({Bytes} bytes) dropped, guest continues on {InService} replicas")]
    public static partial void Faulted(ILogger logger, int replica, string endPoint, string reason, int jobs, long bytes, int inService);

    [LoggerMessage(EventId = 3002, Level = LogLevel.Information, Message = "Replica {Replica}: live repair started for {Extents} of {Total} extents, about {MiB:0.0} MiB to copy ({Mode})")]
    public static partial void RepairStarted(ILogger logger, int replica, int extents, int total, double miB, string mode);

    [LoggerMessage(EventId = 3003, Level = LogLevel.Information, Message = "Replica {Replica}: live repair {Done}/{Total} extents ({MiB:0.0} MiB at {Rate:0.0} MiB/s)")]
    public static partial void RepairProgress(ILogger logger, int replica, int done, int total, double miB, double rate);

    [LoggerMessage(EventId = 3004, Level = LogLevel.Information, Message = "Replica {Replica} back in service after repairing {Extents} extents ({MiB:0.0} MiB) in {Seconds:0.00} s")]
    public static partial void RepairDone(ILogger logger, int replica, int extents, double miB, double seconds);

    [LoggerMessage(EventId = 3005, Level = LogLevel.Information, Message = "Generation {Generation}: reconciled {Replicas} replicas, {Repaired} extents repaired, flush number {Flush}")]
    public static partial void Reconciled(ILogger logger, ulong generation, int replicas, int repaired, ulong flush);

    [LoggerMessage(EventId = 3006, Level = LogLevel.Warning, Message = "Read of blocks {First}+{Count} from replica {Replica} was bad ({Problem}); served from replica {Good} and repaired")]
    public static partial void ReadRepaired(ILogger logger, long first, int count, int replica, string problem, int good);

    [LoggerMessage(EventId = 3007, Level = LogLevel.Warning, Message = "Only {InService} replica(s) in service: writes fail with EIO until a second one returns")]
    public static partial void Degraded(ILogger logger, int inService);

    [LoggerMessage(EventId = 3008, Level = LogLevel.Information, Message = "Replica {Replica} ({EndPoint}) unreachable: {Reason}; retrying")]
    public static partial void ConnectFailed(ILogger logger, int replica, string endPoint, string reason);

    [LoggerMessage(EventId = 3009, Level = LogLevel.Warning, Message = "Replica {Replica}: changed-block record dropped ({Reason}); its repair compares extents and copies each differing {ExtentMiB:0.#} MiB extent whole")]
    public static partial void ChangeRecordDropped(ILogger logger, int replica, string reason, double extentMiB);

    [LoggerMessage(EventId = 3010, Level = LogLevel.Information, Message = "Repair pace set: {RateLimit}, duty cycle {DutyCycle:0.##} while the guest does IO")]
    public static partial void RepairPaceSet(ILogger logger, string rateLimit, double dutyCycle);

    [LoggerMessage(EventId = 3011, Level = LogLevel.Information, Message = "Stopping: replica {Replica}'s live repair has {Left} of {Total} extents to go; it gets up to {Seconds:0.#} s to finish")]
    public static partial void StopWaitsForRepair(ILogger logger, int replica, int left, int total, double seconds);

    [LoggerMessage(EventId = 3012, Level = LogLevel.Warning, Message = "Stopping with replica {Replica} under live repair ({Left} of {Total} extents to go): it is left behind, and the next activation reconciles it")]
    public static partial void LeftMidRepair(ILogger logger, int replica, int left, int total);

    [LoggerMessage(EventId = 3050, Level = LogLevel.Information, Message = "Reconciliation: {Done}/{Total} extent copies made ({Repaired} so far), {Seconds:0} s so far")]
    public static partial void ReconcileProgress(ILogger logger, int done, int total, int repaired, double seconds);

    [LoggerMessage(EventId = 3060, Level = LogLevel.Information, Message = "Scrub {Outcome}: {Checked} block copies checked, {Repaired} repaired in {Seconds:0.0} s")]
    public static partial void ScrubDone(ILogger logger, long @checked, long repaired, double seconds, string outcome);
}

using System.Diagnostics;
using System.Net;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>Where one replica stands, as the guest sees it.</summary>
public enum ReplicaState
{
    /// <summary>Not connected yet (startup) or reconnecting after a fault.</summary>
    Connecting,

    /// <summary>In service: gets every job, its acks count, reads may go to it.</summary>
    Active,

    /// <summary>Connected and being live-repaired: gets every write, but its acks don't count and reads avoid it.</summary>
    Repairing,

    /// <summary>Taken out of service; its jobs were dropped. Reconnects and repairs in the background.</summary>
    Faulted,
}

/// <summary>
/// One downstairs as the engine tracks it: connection, state, outstanding budget and counters.
/// All mutation happens under the engine's submission lock; counters are read lock-free for status.
/// </summary>
internal sealed class ReplicaLink(int index, IPEndPoint endPoint)
{
    private long _completed;
    private long _errors;
    private long _faults;

    public int Index { get; } = index;

    public IPEndPoint EndPoint { get; } = endPoint;

    public ReplicaState State { get; set; } = ReplicaState.Connecting;

    /// <summary>The live connection; replaced on every reconnect (continuations compare against it).</summary>
    public IDownstairs? Client { get; set; }

    public HelloReply? Region { get; set; }

    public int OutstandingJobs { get; private set; }

    public long OutstandingBytes { get; private set; }

    /// <summary>Stopwatch timestamp of the last completion (or of the first outstanding job).</summary>
    public long LastProgress { get; private set; } = Stopwatch.GetTimestamp();

    public long Completed => Interlocked.Read(ref _completed);

    public long Errors => Interlocked.Read(ref _errors);

    public long Faults => Interlocked.Read(ref _faults);

    public string? LastFault { get; set; }

    /// <summary>Stopwatch timestamp of the previous fault (0: never faulted).</summary>
    public long LastFaultAt { get; set; }

    /// <summary>Current reconnect delay; grows while the replica keeps failing soon after returning.</summary>
    public TimeSpan ReconnectDelay { get; set; }

    /// <summary>True when this fault follows the previous one closely: the replica is flapping.</summary>
    public bool IsFlapping(TimeSpan window) => LastFaultAt != 0 && Stopwatch.GetElapsedTime(LastFaultAt) < window;

    public int RepairDone { get; set; }

    public int RepairTotal { get; set; }

    /// <summary>
    /// Extents a live repair chose and has not copied yet (engine lock). Kept when the repair is
    /// interrupted: a flush during the repair may have stamped such an extent current although its
    /// data is stale, so the next repair must copy it whatever its metadata says.
    /// </summary>
    public HashSet<int> PendingRepair { get; } = [];

    /// <summary>Signalled when the link needs a (re)connection.</summary>
    public SemaphoreSlim NeedsConnection { get; } = new(0, 1);

    /// <summary>Wakes the reconnect loop (idempotent).</summary>
    public void RequestConnection()
    {
        if (NeedsConnection.CurrentCount == 0)
        {
            try
            {
                NeedsConnection.Release();
            }
            catch (SemaphoreFullException)
            {
            }
        }
    }

    /// <summary>Region uuid this replica served when first seen; a reconnect must find the same region.</summary>
    public Guid RegionId { get; set; }

    /// <summary>Jobs completed per second, sampled by the watchdog.</summary>
    public double CompletedPerSecond { get; set; }

    public long CompletedAtLastSample { get; set; }

    public bool ReceivesWrites => State is ReplicaState.Active or ReplicaState.Repairing;

    public void Charge(long bytes)
    {
        if (OutstandingJobs == 0)
        {
            // Idle until now: the no-progress clock starts with this job, not at the last completion.
            LastProgress = Stopwatch.GetTimestamp();
        }
        OutstandingJobs++;
        OutstandingBytes += bytes;
    }

    public void Complete(long bytes, bool ok)
    {
        OutstandingJobs--;
        OutstandingBytes -= bytes;
        LastProgress = Stopwatch.GetTimestamp();
        Interlocked.Increment(ref ok ? ref _completed : ref _errors);
    }

    /// <summary>Forgets everything outstanding (the jobs were dropped with the connection).</summary>
    public void Drop()
    {
        OutstandingJobs = 0;
        OutstandingBytes = 0;
        Interlocked.Increment(ref _faults);
    }

    public void CountError() => Interlocked.Increment(ref _errors);
}

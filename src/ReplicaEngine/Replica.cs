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
/// One downstairs as the engine loop tracks it: a state machine (the only way its state changes is
/// through the transitions below, each of which checks where it comes from), the live connection,
/// and the work outstanding on it. Owned by the loop: nothing here is touched from another thread.
/// </summary>
/// <remarks>
/// <code>
///   Connecting ──Activate──▶ Active ◀──FinishRepair── Repairing
///       ▲                      │                          ▲
///       │                      └────────Fault─────┐       │
///       └──────(reconnect loop)── Faulted ◀───────┴──Fault┘
///                                  │
///                                  └──BeginRepair (a new connection)──▶ Repairing
/// </code>
/// </remarks>
internal sealed class Replica(int index, IPEndPoint endPoint, TimeProvider time)
{
    public int Index { get; } = index;

    public IPEndPoint EndPoint { get; } = endPoint;

    public ReplicaState State { get; private set; } = ReplicaState.Connecting;

    /// <summary>The live connection; replaced on every reconnect (replies from an older one only release memory).</summary>
    public ReplicaConnection? Connection { get; private set; }

    public bool ReceivesWrites => State is ReplicaState.Active or ReplicaState.Repairing;

    public bool InService => State == ReplicaState.Active;

    /// <summary>Region uuid this replica served when first seen; a reconnect must find the same region.</summary>
    public Guid RegionId { get; set; }

    public int OutstandingJobs { get; private set; }

    public long OutstandingBytes { get; private set; }

    /// <summary>Timestamp (<see cref="TimeProvider.GetTimestamp"/>) of the last completion, or of the first outstanding job.</summary>
    public long LastProgress { get; private set; } = time.GetTimestamp();

    public long Completed { get; private set; }

    public long Errors { get; private set; }

    public long Faults { get; private set; }

    public string? LastFault { get; private set; }

    /// <summary>Timestamp of the previous fault (0: never faulted).</summary>
    public long LastFaultAt { get; private set; }

    /// <summary>Current reconnect delay; grows while the replica keeps failing soon after returning.</summary>
    public TimeSpan ReconnectDelay { get; private set; }

    public int RepairDone { get; set; }

    public int RepairTotal { get; set; }

    /// <summary>What it missed while out of service (see <see cref="ChangeRecord"/>).</summary>
    public ChangeRecord Changes { get; set; } = ChangeRecord.None;

    /// <summary>The running repair: bytes copied and (estimated) to copy, and how it decided what to copy.</summary>
    public long RepairBytesDone { get; set; }

    public long RepairBytesTotal { get; set; }

    public long RepairStartedAt { get; set; }

    /// <summary>"changed-blocks" (its record said what it missed) or "extents" (extents compared); null: no repair.</summary>
    public string? RepairMode { get; set; }

    /// <summary>Bytes every repair of this replica copied to it, and seconds spent repairing it (metrics).</summary>
    public long RepairBytesCopied { get; set; }

    public double RepairSeconds { get; set; }

    /// <summary>
    /// Extents a live repair chose and has not copied yet. Kept when the repair is interrupted: a
    /// flush during the repair may have stamped such an extent current although its data is stale,
    /// so the next repair must copy it whatever its metadata says.
    /// </summary>
    public HashSet<int> PendingRepair { get; } = [];

    /// <summary>Jobs completed per second, sampled by the tick.</summary>
    public double CompletedPerSecond { get; set; }

    public long CompletedAtLastSample { get; set; }

    // ------------------------------------------------------------ transitions

    /// <summary>Startup: a reconciled connection goes straight into service.</summary>
    public void Activate(ReplicaConnection connection)
    {
        Expect(ReplicaState.Connecting, nameof(Activate));
        Connection = connection;
        State = ReplicaState.Active;
        Changes.Start();
    }

    /// <summary>A new connection after a fault (or a late start): it receives writes from now on while it is repaired.</summary>
    public void BeginRepair(ReplicaConnection connection, int extents)
    {
        if (State is not (ReplicaState.Connecting or ReplicaState.Faulted))
        {
            throw new InvalidOperationException($"replica {Index}: {nameof(BeginRepair)} from {State}");
        }
        Connection = connection;
        State = ReplicaState.Repairing;
        OutstandingJobs = 0;
        OutstandingBytes = 0;
        RepairTotal = extents;
        RepairDone = 0;
    }

    public void FinishRepair()
    {
        Expect(ReplicaState.Repairing, nameof(FinishRepair));
        State = ReplicaState.Active;
        RepairMode = null;
        // Every extent it missed was copied (a copy takes its granules; a failed one puts them back
        // and is retried): from here the record starts empty.
        Changes.Start();
    }

    /// <summary>
    /// Out of service: its connection is given up (the caller closes it) and its outstanding work
    /// forgotten. Returns false if it was not in a state that can fault (already out).
    /// </summary>
    public bool Fault(string reason, TimeSpan flapWindow, TimeSpan initialDelay, TimeSpan maxDelay, out bool flapping)
    {
        flapping = false;
        if (State is ReplicaState.Faulted or ReplicaState.Connecting)
        {
            return false;
        }
        long now = time.GetTimestamp();
        // A replica that fails again soon after returning (a disk still full, an extent still poisoned)
        // backs off exponentially, so a fault loop stays quiet and cheap.
        flapping = LastFaultAt != 0 && time.GetElapsedTime(LastFaultAt, now) < flapWindow;
        ReconnectDelay = flapping
            ? TimeSpan.FromTicks(Math.Min(Math.Max(ReconnectDelay.Ticks * 2, initialDelay.Ticks), maxDelay.Ticks))
            : TimeSpan.Zero;
        LastFaultAt = now;
        LastFault = reason;
        State = ReplicaState.Faulted;
        Connection = null;
        OutstandingJobs = 0;
        OutstandingBytes = 0;
        RepairDone = 0;
        RepairTotal = 0;
        RepairBytesDone = 0;
        RepairBytesTotal = 0;
        RepairMode = null;
        Faults++;
        return true;
    }

    /// <summary>Shutdown: out of service for good.</summary>
    public void Detach()
    {
        State = ReplicaState.Faulted;
        Connection = null;
    }

    private void Expect(ReplicaState from, string transition)
    {
        if (State != from)
        {
            throw new InvalidOperationException($"replica {Index}: {transition} from {State}");
        }
    }

    // ------------------------------------------------------------ accounting

    public void Charge(long bytes)
    {
        if (OutstandingJobs == 0)
        {
            // Idle until now: the no-progress clock starts with this job, not at the last completion.
            LastProgress = time.GetTimestamp();
        }
        OutstandingJobs++;
        OutstandingBytes += bytes;
    }

    public void Complete(long bytes, bool ok)
    {
        OutstandingJobs--;
        OutstandingBytes -= bytes;
        LastProgress = time.GetTimestamp();
        if (ok)
        {
            Completed++;
        }
        else
        {
            Errors++;
        }
    }

    public void CountError() => Errors++;

    public ReplicaStatus Status()
    {
        double? rate = null;
        double? secondsLeft = null;
        if (State == ReplicaState.Repairing && RepairStartedAt != 0)
        {
            double elapsed = time.GetElapsedTime(RepairStartedAt).TotalSeconds;
            if (elapsed > 0 && RepairBytesDone > 0)
            {
                rate = Math.Round(RepairBytesDone / elapsed);
                secondsLeft = Math.Round(Math.Max(0, RepairBytesTotal - RepairBytesDone) / rate.Value, 1);
            }
        }
        return new(Index, EndPoint.ToString(), State, OutstandingJobs, OutstandingBytes, Completed, Math.Round(CompletedPerSecond, 1), Errors, Faults, LastFault, RepairDone, RepairTotal)
        {
            RepairBytesDone = RepairBytesDone,
            RepairBytesTotal = RepairBytesTotal,
            RepairBytesPerSecond = rate,
            RepairSecondsLeft = secondsLeft,
            RepairMode = RepairMode,
            ChangeRecordBytes = Changes.Valid ? Changes.Granules * Changes.GranuleBytes : null,
            RepairBytesCopied = RepairBytesCopied,
            RepairSeconds = Math.Round(RepairSeconds, 3),
        };
    }
}

/// <summary>
/// One connection to one replica as the loop sees it: the client, and the sink its replies arrive
/// at. Replies are posted to the loop tagged with this object, so a reply from a connection the
/// replica has since replaced is recognised and only frees the memory it held.
/// </summary>
internal sealed class ReplicaConnection(Engine engine, int replica) : IDownstairsReplyHandler
{
    public int Replica { get; } = replica;

    /// <summary>Set once the connector returns; replies cannot arrive before a job is submitted, which needs it.</summary>
    public IDownstairs Client { get; set; } = null!;

    public HelloReply Region => Client.Region;

    /// <summary>Closed by the engine (faulted, replaced or shut down): no new jobs go to it.</summary>
    public bool Closed { get; set; }

    /// <summary>Requests were queued since the last batch end: the sender must be woken.</summary>
    public bool HasUnflushed { get; set; }

    public void OnReply(ulong jobId, DownstairsResult result, ExtentMeta meta) => engine.PostReply(this, jobId, result, meta);
}

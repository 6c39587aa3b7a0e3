namespace NbdServer.ReplicaEngine;

/// <summary>
/// An extent being copied to a repairing replica. Guest writes to it are not held: they go to the
/// replicas in service at once (the guest's ack never waits for the copy) and are queued for the
/// repairing replica, which gets them, in order, right after the copy is committed. Sent to it
/// earlier, the commit would overwrite them with the older copy.
/// </summary>
internal sealed class RepairCopy(Replica target, ReplicaConnection connection, long first, long end)
{
    public Replica Target { get; } = target;

    public ReplicaConnection Connection { get; } = connection;

    public long First { get; } = first;

    public long End { get; } = end;

    public List<Job> Deferred { get; } = [];

    public long DeferredBytes { get; set; }
}

/// <summary>The copies in progress and the writes they hold back. Owned by the loop.</summary>
internal sealed class RepairCopies(Engine engine)
{
    private readonly List<RepairCopy> _copies = [];

    public RepairCopy Begin(Replica target, ReplicaConnection connection, int extent)
    {
        var copy = new RepairCopy(target, connection, (long)extent * engine.ExtentBlocks, (long)(extent + 1) * engine.ExtentBlocks);
        _copies.Add(copy);
        return copy;
    }

    /// <summary>A write for a replica whose extent is being copied: queued behind the copy (true), or not concerned (false).</summary>
    public bool TryDefer(Replica replica, ReplicaConnection connection, Job job)
    {
        foreach (RepairCopy copy in _copies)
        {
            if (copy.Target != replica || copy.Connection != connection || !job.Overlaps(copy.First, copy.End))
            {
                continue;
            }
            EngineOptions options = engine.Options;
            if (replica.OutstandingJobs + copy.Deferred.Count + 1 > options.MaxOutstandingJobs
                || replica.OutstandingBytes + copy.DeferredBytes + job.Bytes > options.MaxOutstandingBytes)
            {
                engine.Fault(replica, $"repair fell behind: {copy.Deferred.Count} writes ({copy.DeferredBytes} bytes) queued behind the copy of blocks {copy.First}..{copy.End}, {replica.OutstandingJobs} more outstanding");
                return true;
            }
            // Holds the job's buffer (not counted toward its ack) until the write is sent or dropped.
            job.DeferredCount++;
            copy.Deferred.Add(job);
            copy.DeferredBytes += job.Bytes;
            return true;
        }
        return false;
    }

    /// <summary>
    /// The copy is over: its held-back writes are sent (committed) or dropped (the copy failed; the
    /// extent is copied again). In the same step the extent leaves the replica's pending set, so no
    /// write can fall between "not deferred" and "not pending", where it would be skipped.
    /// </summary>
    public void End(RepairCopy copy, bool committed)
    {
        _copies.Remove(copy);
        Replica target = copy.Target;
        bool send = committed && target.Connection == copy.Connection && target.ReceivesWrites;
        if (send)
        {
            target.PendingRepair.Remove((int)(copy.First / engine.ExtentBlocks));
            target.RepairDone++;
        }
        foreach (Job job in copy.Deferred)
        {
            job.DeferredCount--;
            if (send)
            {
                engine.Send(target, copy.Connection, job, counted: false);
            }
            engine.TryRetire(job);
        }
        copy.Deferred.Clear();
    }

    /// <summary>The replica faulted: what its copies held back is dropped.</summary>
    public void Drop(Replica replica)
    {
        for (int i = _copies.Count - 1; i >= 0; i--)
        {
            if (_copies[i].Target == replica)
            {
                End(_copies[i], committed: false);
            }
        }
    }

    public (int Jobs, long Bytes) Deferred(Replica replica)
    {
        foreach (RepairCopy copy in _copies)
        {
            if (copy.Target == replica)
            {
                return (copy.Deferred.Count, copy.DeferredBytes);
            }
        }
        return (0, 0);
    }
}

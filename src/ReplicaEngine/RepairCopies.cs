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

    /// <summary>The blocks the held-back writes span (valid while there are any).</summary>
    public long DeferredFirst { get; set; }

    public long DeferredEnd { get; set; }

    /// <summary>Copied whole (staged), not from the changed-block record.</summary>
    public bool Whole { get; set; }

    /// <summary>Its commit was sent and its held-back writes released; only the commit's answer is awaited.</summary>
    public bool Committing { get; set; }

    /// <summary>The granules taken from the replica's changed-block record for this copy (null: none); put back if it fails.</summary>
    public ulong[]? Taken { get; set; }
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
            if (copy.Target != replica || copy.Connection != connection || !Holds(copy, job))
            {
                continue;
            }
            EngineOptions options = engine.Options;
            (int deferredJobs, long deferredBytes) = Deferred(replica);
            if (replica.OutstandingJobs + deferredJobs + 1 > options.MaxOutstandingJobs
                || replica.OutstandingBytes + deferredBytes + job.Bytes > options.MaxOutstandingBytes)
            {
                engine.Fault(replica, $"repair fell behind: {copy.Deferred.Count} writes ({copy.DeferredBytes} bytes) queued behind the copy of blocks {copy.First}..{copy.End}, {replica.OutstandingJobs} more outstanding");
                engine.MarkMissed(replica, job);
                return true;
            }
            // Holds the job's buffer (not counted toward its ack) until the write is sent or dropped.
            job.DeferredCount++;
            Add(copy, job);
            return true;
        }
        return false;
    }

    /// <summary>
    /// The copy is over: its held-back writes are sent (committed) or dropped (the copy failed; the
    /// extent is copied again). In the same step the extent leaves the replica's pending set, so no
    /// write can fall between "not deferred" and "not pending", where it would be skipped.
    /// </summary>
    /// <summary>
    /// The copy's commit has just been sent (in this loop turn): the held-back writes follow it now,
    /// on the same connection, so no flush dispatched later can overtake them (it would find the
    /// extent clean on this replica and stamp it on the others: the copies' metadata would part).
    /// From here writes to the extent go to the replica like any other.
    /// </summary>
    public void Commit(RepairCopy copy)
    {
        if (!_copies.Contains(copy))
        {
            return; // dropped: the replica faulted
        }
        copy.Committing = true;
        Release(copy, attached: copy.Target.Connection == copy.Connection && copy.Target.ReceivesWrites, committed: true);
    }

    /// <summary>
    /// An in-place copy is about to read the metadata its commit will record: the writes held back so
    /// far go to the replica now, ahead of the commit. The source applied them before that read, so
    /// the metadata covers them (a flush that stamped them on the source is in it); sent after the
    /// commit they would leave the extent dirty here and clean there. Later writes still wait.
    /// </summary>
    public void ReleaseHeld(RepairCopy copy)
    {
        if (!_copies.Contains(copy) || copy.Target.Connection != copy.Connection || !copy.Target.ReceivesWrites)
        {
            return;
        }
        List<Job> held = [.. copy.Deferred];
        copy.Deferred.Clear();
        copy.DeferredBytes = 0;
        foreach (Job job in held)
        {
            if (MoveToOverlappingCopy(copy, job))
            {
                continue; // also spans another extent being copied: it waits for that copy
            }
            job.DeferredCount--;
            engine.Send(copy.Target, copy.Connection, job, counted: false);
            engine.TryRetire(job);
        }
    }

    public void End(RepairCopy copy, bool committed)
    {
        if (copy.Committing)
        {
            copy.Committing = false;
            if (!committed)
            {
                // The commit failed (the replica is being faulted): what the copy wrote is not durable,
                // and a copy that took no granules (whole, or only the metadata) is owed just the same.
                int extent = (int)(copy.First / engine.ExtentBlocks);
                if (copy.Taken is { } granules)
                {
                    copy.Target.Changes.Restore(extent, granules);
                }
                copy.Target.PendingRepair.Add(extent);
            }
            return;
        }
        if (!_copies.Contains(copy))
        {
            return; // already ended (dropped when the replica faulted)
        }
        Release(copy, attached: copy.Target.Connection == copy.Connection && copy.Target.ReceivesWrites, committed);
    }

    private void Release(RepairCopy copy, bool attached, bool committed)
    {
        _copies.Remove(copy);
        Replica target = copy.Target;
        int extent = (int)(copy.First / engine.ExtentBlocks);
        if (committed && attached)
        {
            target.PendingRepair.Remove(extent);
            target.RepairDone++;
        }
        else if (copy.Taken is { } taken)
        {
            target.Changes.Restore(extent, taken);
        }
        foreach (Job job in copy.Deferred)
        {
            if (attached && MoveToOverlappingCopy(copy, job))
            {
                continue; // also spans an extent still being copied: it waits for that copy too
            }
            job.DeferredCount--;
            if (attached)
            {
                // Committed: the write follows the copy. Failed (a source failed, the extent is
                // copied again): it goes now; the next copy reads a source that has it, and the part
                // of it outside this extent would otherwise be lost to the replica.
                engine.Send(target, copy.Connection, job, counted: false);
            }
            else
            {
                engine.MarkMissed(target, job);
            }
            engine.TryRetire(job);
        }
        copy.Deferred.Clear();
    }

    private bool MoveToOverlappingCopy(RepairCopy ended, Job job)
    {
        foreach (RepairCopy other in _copies)
        {
            if (other != ended && other.Target == ended.Target && other.Connection == ended.Connection && Holds(other, job))
            {
                Add(other, job);
                return true;
            }
        }
        return false;
    }

    /// <summary>
    /// Whether a write must wait behind this copy: it overlaps the extent being copied, or a write
    /// already waiting there (sent now, it would overtake that older write on the blocks they share:
    /// a write spanning this extent and an already copied one waits, a later write to the copied
    /// one alone must wait behind it).
    /// </summary>
    private static bool Holds(RepairCopy copy, Job job)
    {
        if (job.Overlaps(copy.First, copy.End))
        {
            return true;
        }
        if (copy.Deferred.Count == 0 || !job.Overlaps(copy.DeferredFirst, copy.DeferredEnd))
        {
            return false;
        }
        foreach (Job waiting in copy.Deferred)
        {
            if (job.Overlaps(waiting.FirstBlock, waiting.EndBlock))
            {
                return true;
            }
        }
        return false;
    }

    private static void Add(RepairCopy copy, Job job)
    {
        copy.DeferredFirst = copy.Deferred.Count == 0 ? job.FirstBlock : Math.Min(copy.DeferredFirst, job.FirstBlock);
        copy.DeferredEnd = copy.Deferred.Count == 0 ? job.EndBlock : Math.Max(copy.DeferredEnd, job.EndBlock);
        copy.Deferred.Add(job);
        copy.DeferredBytes += job.Bytes;
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
        (int jobs, long bytes) = (0, 0);
        foreach (RepairCopy copy in _copies)
        {
            if (copy.Target == replica)
            {
                jobs += copy.Deferred.Count;
                bytes += copy.DeferredBytes;
            }
        }
        return (jobs, bytes);
    }
}

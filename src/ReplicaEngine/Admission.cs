using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// Which guest writes and flushes may go now. A job that may not waits here, parked in arrival
/// order, and is looked at again after every turn of the loop — no polling, no sleeping guest:
/// <list type="bullet">
/// <item>fewer than two replicas in service: it waits up to <see cref="EngineOptions.DegradedWriteTimeout"/> for a second one, then fails with EIO;</item>
/// <item>backpressure: when the second-least-loaded replica in service is past <see cref="EngineOptions.BackpressureStart"/>
/// of its budget (two slow replicas slow the guest, smoothly), or the most loaded one taking writes is past
/// <see cref="EngineOptions.SlowReplicaBackpressureStart"/>, it is held back along a quadratic curve up to
/// <see cref="EngineOptions.MaxAdmissionDelay"/> (two loaded, or one under repair) or
/// <see cref="EngineOptions.SlowReplicaMaxAdmissionDelay"/> (one Active): one slow replica costs the guest at most a short delay, never a stall;</item>
/// <item>at the full budget with only two in service, it waits for them to drain (the watchdog faults one that cannot);</item>
/// <item>a write overlapping a range under read-modify-write, or an earlier parked write, waits for it (order is kept).</item>
/// </list>
/// </summary>
internal sealed class Admission(Engine engine, EngineOptions options, TimeProvider time)
{
    private readonly List<Job> _parked = [];
    private readonly List<(long First, long End)> _blocked = [];
    private ITimer? _due;
    private long _dueAt = long.MaxValue;

    public int Parked => _parked.Count;

    public void Arrive(Job job)
    {
        long now = time.GetTimestamp();
        job.AdmitDeadline = now + (long)(options.DegradedWriteTimeout.TotalSeconds * time.TimestampFrequency);
        TimeSpan delay = AdmissionDelay(job.Bytes);
        if (delay > TimeSpan.Zero)
        {
            job.NotBefore = now + Math.Max(1, (long)(delay.TotalSeconds * time.TimestampFrequency));
        }
        if (_parked.Count == 0 && CanGo(job, now) == Verdict.Go)
        {
            engine.DispatchToAll(job);
            return;
        }
        _parked.Add(job);
    }

    /// <summary>After each turn: dispatch every parked job that may go now, in order.</summary>
    public void AdmitParked()
    {
        if (_parked.Count == 0)
        {
            return;
        }
        long now = time.GetTimestamp();
        _blocked.Clear();
        long earliest = long.MaxValue;
        for (int i = 0; i < _parked.Count; i++)
        {
            Job job = _parked[i];
            Verdict verdict = BlockedByEarlier(job) ? Verdict.Skip : CanGo(job, now);
            if (verdict == Verdict.Go)
            {
                _parked.RemoveAt(i--);
                engine.DispatchToAll(job);
                continue;
            }
            if (verdict == Verdict.StopAll)
            {
                if (job.NotBefore > now)
                {
                    earliest = Math.Min(earliest, job.NotBefore);
                }
                break;
            }
            _blocked.Add(job.Kind == JobKind.Flush ? (long.MinValue, long.MaxValue) : (job.FirstBlock, job.EndBlock));
        }
        ArmDue(earliest);
    }

    /// <summary>Tick: writes waiting longer than allowed for a second replica fail with EIO.</summary>
    public void CheckDeadlines(long now)
    {
        if (engine.InServiceCount >= 2)
        {
            return;
        }
        for (int i = 0; i < _parked.Count; i++)
        {
            Job job = _parked[i];
            if (now > job.AdmitDeadline)
            {
                _parked.RemoveAt(i--);
                engine.Fail(job, new DownstairsResult(ResultCode.IoError, 0, $"only {engine.InServiceCount} replica(s) in service; a write needs two"));
            }
        }
    }

    public void FailAll(DownstairsResult why)
    {
        foreach (Job job in _parked)
        {
            engine.Fail(job, why);
        }
        _parked.Clear();
        _due?.Dispose();
    }

    private enum Verdict
    {
        Go,

        /// <summary>This one waits, later ones may go (it waits for a range).</summary>
        Skip,

        /// <summary>Nothing may go (a global condition): keeps arrival order.</summary>
        StopAll,
    }

    private Verdict CanGo(Job job, long now)
    {
        if (engine.InServiceCount < 2 || job.NotBefore > now)
        {
            return Verdict.StopAll;
        }
        if (SecondLeastLoad(job.Bytes) >= 1.0 || Saturated())
        {
            return Verdict.StopAll;
        }
        if (job.Kind != JobKind.Flush && !job.HoldsRangeLock && engine.RangeLocks.Overlaps(job.FirstBlock, job.EndBlock))
        {
            return Verdict.Skip;
        }
        return Verdict.Go;
    }

    private bool BlockedByEarlier(Job job)
    {
        foreach ((long first, long end) in _blocked)
        {
            if (job.Kind == JobKind.Flush || (first < job.EndBlock && job.FirstBlock < end))
            {
                return true;
            }
        }
        return false;
    }

    /// <summary>The one-shot timer fired: nothing is armed any more (the next settle arms it again if a job still waits).</summary>
    public void DueTimerFired() => _dueAt = long.MaxValue;

    private void ArmDue(long at)
    {
        if (at == long.MaxValue || at >= _dueAt)
        {
            return; // an earlier wake-up is armed; it re-arms for the rest
        }
        _dueAt = at;
        // Timers count whole milliseconds and round down: rounded up here, so the wake-up never
        // comes before the moment (one that came early found nothing due and nothing armed: a
        // write parked until some other event arrived, which for a lone writer was never).
        TimeSpan wait = TimeSpan.FromMilliseconds(Math.Ceiling(Math.Max(0, time.GetElapsedTime(time.GetTimestamp(), at).TotalMilliseconds)) + 1);
        _due ??= time.CreateTimer(static s => ((Engine)s!).PostAdmissionDue(), engine, Timeout.InfiniteTimeSpan, Timeout.InfiniteTimeSpan);
        _due.Change(wait, Timeout.InfiniteTimeSpan);
    }

    /// <summary>
    /// With two replicas or fewer in service a replica at its job budget can't be faulted (that would
    /// fail every write), so admission waits instead: its connection must never be given more than
    /// the downstairs accepts. The watchdog still faults one that is stuck.
    /// </summary>
    private bool Saturated()
    {
        if (engine.InServiceCount > 2)
        {
            return false;
        }
        foreach (Replica replica in engine.Replicas)
        {
            if (replica.InService && replica.OutstandingJobs >= options.MaxOutstandingJobs)
            {
                return true;
            }
        }
        return false;
    }

    /// <summary>
    /// The larger of the curves: two loaded replicas may hold the guest back up to
    /// <see cref="EngineOptions.MaxAdmissionDelay"/>, and so may one under repair (its disk takes
    /// the copies too, by our doing; faulted at its budget it would start over, again and again);
    /// one Active replica alone only up to <see cref="EngineOptions.SlowReplicaMaxAdmissionDelay"/>,
    /// past which it is left to reach its budget, be faulted and be caught up.
    /// </summary>
    private TimeSpan AdmissionDelay(long bytes)
    {
        double both = Excess(SecondLeastLoad(bytes), options.BackpressureStart);
        long delay = (long)(options.MaxAdmissionDelay.Ticks * both * both);
        foreach (Replica replica in engine.Replicas)
        {
            if (replica.ReceivesWrites)
            {
                double one = Excess(Load(replica, bytes), options.SlowReplicaBackpressureStart);
                TimeSpan top = replica.State == ReplicaState.Repairing ? options.MaxAdmissionDelay : options.SlowReplicaMaxAdmissionDelay;
                delay = Math.Max(delay, (long)(top.Ticks * one * one));
            }
        }
        return TimeSpan.FromTicks(delay);
    }

    /// <summary>How far <paramref name="load"/> is past <paramref name="start"/>, on the way to a full budget: 0..1.</summary>
    private static double Excess(double load, double start) => Math.Clamp((load - start) / (1.0 - start), 0, 1);

    /// <summary>A replica's share of its budget once this job is added; writes queued behind a repair copy count too.</summary>
    private double Load(Replica replica, long bytes)
    {
        (int deferredJobs, long deferredBytes) = engine.Deferred(replica);
        return Math.Max((replica.OutstandingJobs + deferredJobs + 1) / (double)options.MaxOutstandingJobs,
            (replica.OutstandingBytes + deferredBytes + bytes) / (double)options.MaxOutstandingBytes);
    }

    private double SecondLeastLoad(long bytes)
    {
        Span<double> loads = stackalloc double[Job.MaxReplicas];
        int count = 0;
        foreach (Replica replica in engine.Replicas)
        {
            if (replica.InService)
            {
                loads[count++] = Load(replica, bytes);
            }
        }
        if (count < 2)
        {
            return 0;
        }
        loads[..count].Sort();
        return loads[1];
    }
}

/// <summary>A claim on blocks [First, End) for a read-modify-write or a read repair.</summary>
internal sealed class RangeLease(long first, long end)
{
    public long First { get; } = first;

    public long End { get; } = end;

    /// <summary>Completes when the range is this lease's.</summary>
    public TaskCompletionSource Granted { get; } = new(TaskCreationOptions.RunContinuationsAsynchronously);

    public bool Overlaps(long first, long end) => First < end && first < End;
}

/// <summary>
/// Block ranges held by a read-modify-write (or a read repair): no other write to them is dispatched
/// between its read and its write, where it would be silently undone. Owned by the loop.
/// </summary>
internal sealed class RangeLocks
{
    private readonly List<RangeLease> _held = [];
    private readonly List<RangeLease> _waiting = [];

    public bool Overlaps(long first, long end)
    {
        foreach (RangeLease held in _held)
        {
            if (held.Overlaps(first, end))
            {
                return true;
            }
        }
        return false;
    }

    /// <summary>Takes the range now, or never (a read repair must not wait on its own read's lock).</summary>
    public bool TryTake(RangeLease lease)
    {
        if (Overlaps(lease.First, lease.End))
        {
            return false;
        }
        _held.Add(lease);
        lease.Granted.TrySetResult();
        return true;
    }

    /// <summary>Grants the range when it is free; overlapping waiters are served in arrival order.</summary>
    public void Take(RangeLease lease)
    {
        if (_waiting.Exists(w => w.Overlaps(lease.First, lease.End)) || !TryTake(lease))
        {
            _waiting.Add(lease);
        }
    }

    public void Release(RangeLease lease)
    {
        _held.Remove(lease);
        for (int i = 0; i < _waiting.Count; i++)
        {
            RangeLease next = _waiting[i];
            bool earlierOverlaps = false;
            for (int j = 0; j < i && !earlierOverlaps; j++)
            {
                earlierOverlaps = _waiting[j].Overlaps(next.First, next.End);
            }
            if (!earlierOverlaps && TryTake(next))
            {
                _waiting.RemoveAt(i--);
            }
        }
    }
}

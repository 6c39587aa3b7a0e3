using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The upstairs' state and the one loop that owns it (Crucible's select → apply): guest jobs,
/// downstairs replies, ticks and requests from the background workers arrive as events on an
/// <see cref="EventQueue{T}"/> and are applied in turn; after each turn the invariants are restored
/// (parked writes admitted, each touched replica's sender woken once, completions delivered).
/// Nothing here takes a lock; nothing here blocks.
/// </summary>
/// <remarks>
/// Every job gets a new id and goes to every replica taking writes in id order (each downstairs
/// keeps overlapping jobs in the order received, which is what keeps replicas identical). A write
/// is acknowledged once two replicas in service applied it, a flush once two made it durable. A
/// replica that fails, stalls or falls too far behind is faulted — its jobs stop counting, the
/// guest goes on with two — and comes back through live repair while IO continues.
/// </remarks>
internal sealed partial class Engine
{
    /// <summary>Two faults of one replica within this window make it "flapping" (backoff, summarised logs).</summary>
    private static readonly TimeSpan FlapWindow = TimeSpan.FromSeconds(10);

    /// <summary>How often the loop checks deadlines (read attempts, degraded writes, no progress) and samples rates.</summary>
    internal static readonly TimeSpan TickInterval = TimeSpan.FromMilliseconds(100);

    private readonly EngineOptions _options;
    private readonly ILogger _logger;
    private readonly LogThrottle _throttle;
    private readonly TimeProvider _time;
    private readonly EventQueue<EngineEvent> _loop;
    private readonly Replica[] _replicas;
    private readonly Dictionary<ulong, Job> _jobs = [];
    private readonly List<Job> _reads = [];
    private readonly Admission _admission;
    private readonly RangeLocks _rangeLocks = new();
    private readonly List<ReplicaConnection> _touched = [];
    private readonly List<(JobCompletion Completion, JobOutcome Outcome, bool Async)> _completions = [];
    private readonly HashSet<int> _dirty = [];
    private readonly Dictionary<ulong, List<int>> _flushing = [];
    private ITimer? _tick;
    private long _lastTick;
    private ulong _nextJobId;

    /// <summary>
    /// True while an event is applied (not while settling): a job asked for by that event is
    /// dispatched at once. Read together with <see cref="IsLoopThread"/>: another thread seeing it
    /// set must post, never dispatch beside the loop.
    /// </summary>
    private bool _applying;

    public Engine(EngineOptions options, ILogger logger, TimeProvider time)
    {
        _options = options;
        _logger = logger;
        _time = time;
        _throttle = new LogThrottle(logger, options.LogThrottleInterval);
        _replicas = [.. options.Downstairs.Select((endPoint, i) => new Replica(i, endPoint, time))];
        _loop = new EventQueue<EngineEvent>(Apply, Settle, e => _throttle.Report(LogLevel.Error, "engine loop: an event failed", () => e.ToString()));
        _admission = new Admission(this, options, time);
        RepairCopies = new RepairCopies(this);
        Pace = new RepairPace(options);
        Reconnect = [.. _replicas.Select(_ => new SemaphoreSlim(0, 1))];
    }

    public EngineOptions Options => _options;

    public ILogger Logger => _logger;

    public LogThrottle Throttle => _throttle;

    public TimeProvider Time => _time;

    public Replica[] Replicas => _replicas;

    public RangeLocks RangeLocks => _rangeLocks;

    /// <summary>Extents being copied to a repairing replica right now, with the writes held back for it.</summary>
    public RepairCopies RepairCopies { get; }

    /// <summary>The repair rate limit and duty cycle in force (changeable while running).</summary>
    public RepairPace Pace { get; }

    /// <summary>Per replica: signalled when it needs a (re)connection (its maintainer waits on it).</summary>
    public SemaphoreSlim[] Reconnect { get; }

    // ------------------------------------------------------------ state set at activation (then owned by the loop)

    public ulong Generation { get; set; }

    public int BlockSize { get; set; }

    public int ExtentBlocks { get; set; }

    public int ExtentCount { get; set; }

    public long Size { get; set; }

    public int MaxIoBytes { get; set; }

    public ulong FlushNumber { get; set; }

    /// <summary>Per extent: the (generation, flush number) every replica in service recorded at the last flush.</summary>
    public ExtentMeta[] Expected { get; set; } = [];

    public HashSet<int> Dirty => _dirty;

    public IReadOnlyDictionary<ulong, List<int>> Flushing => _flushing;

    public bool Serving { get; set; }

    public bool Stopped { get; private set; }

    /// <summary>Timestamp of the last guest read or write (background work paces itself by it).</summary>
    public long LastGuestIo;

    public int InServiceCount
    {
        get
        {
            int n = 0;
            foreach (Replica r in _replicas)
            {
                n += r.InService ? 1 : 0;
            }
            return n;
        }
    }

    public bool IsLoopThread => _loop.IsCurrentThread;

    public ulong NextJobId() => ++_nextJobId;

    // ------------------------------------------------------------ posting (any thread)

    /// <summary>Posts a prepared job; its completion (if any) is delivered by the loop.</summary>
    public void Post(Job job) => _loop.Post(new EngineEvent(EventKind.Submit, job));

    public void PostReply(ReplicaConnection from, ulong jobId, DownstairsResult result, ExtentMeta meta) =>
        _loop.Post(new EngineEvent(EventKind.Reply, null) { From = from, JobId = jobId, Result = result, Meta = meta });

    /// <summary>Runs <paramref name="work"/> on the loop (a worker's state change or question); completes on the thread pool.</summary>
    public Task<T> InvokeAsync<T>(Func<T> work)
    {
        var done = new TaskCompletionSource<T>(TaskCreationOptions.RunContinuationsAsynchronously);
        _loop.Post(new EngineEvent(EventKind.Invoke, null)
        {
            Work = () =>
            {
                try
                {
                    done.TrySetResult(work());
                }
                catch (Exception e)
                {
                    done.TrySetException(e);
                }
            },
        });
        return done.Task;
    }

    public Task InvokeAsync(Action work) => InvokeAsync(() =>
    {
        work();
        return true;
    });

    /// <summary>Synchronous question (status): answered directly on the loop's own thread, else posted and waited for.</summary>
    public T Query<T>(Func<T> question)
    {
        if (IsLoopThread)
        {
            return question();
        }
        Task<T> answer = InvokeAsync(question);
        if (!answer.Wait(TimeSpan.FromSeconds(10)))
        {
            throw new TimeoutException("the engine loop did not answer within 10 s");
        }
        return answer.Result;
    }

    /// <summary>A worker's job to one replica (or all taking writes); completes off the loop.</summary>
    public ValueTask<JobOutcome> RunAsync(Job job)
    {
        JobCompletion completion = JobCompletion.Rent();
        completion.RunAsync = true;
        job.Completion = completion;
        ValueTask<JobOutcome> task = completion.Task;
        if (_applying && IsLoopThread)
        {
            // Asked from within an event (a worker's state change): dispatched in that same step,
            // before anything posted after it.
            Submit(job);
        }
        else
        {
            Post(job);
        }
        return task;
    }

    public void StartTicking()
    {
        _lastTick = _time.GetTimestamp();
        _tick = _time.CreateTimer(static s => ((Engine)s!)._loop.Post(new EngineEvent(EventKind.Tick, null)), this, TickInterval, TickInterval);
    }

    /// <summary>Wakes the admission check at a moment a parked write may go (backpressure delay over).</summary>
    internal void PostAdmissionDue() => _loop.Post(new EngineEvent(EventKind.AdmissionDue, null));

    // ------------------------------------------------------------ apply (the loop)

    private void Apply(EngineEvent e)
    {
        _applying = true;
        try
        {
            ApplyEvent(e);
        }
        finally
        {
            _applying = false;
        }
    }

    private void ApplyEvent(EngineEvent e)
    {
        switch (e.Kind)
        {
            case EventKind.Submit:
                Submit(e.Job!);
                break;
            case EventKind.Reply:
                Reply(e.From!, e.JobId, e.Result, e.Meta);
                break;
            case EventKind.Tick:
                Tick();
                break;
            case EventKind.AdmissionDue:
                _admission.DueTimerFired(); // Settle admits what is due
                break;
            case EventKind.Invoke:
                e.Work!();
                break;
        }
    }

    /// <summary>After each turn: admit what may go, wake each touched sender once, deliver completions.</summary>
    private void Settle()
    {
        _admission.AdmitParked();
        foreach (ReplicaConnection connection in _touched)
        {
            connection.HasUnflushed = false;
            connection.Client.EndBatch();
        }
        _touched.Clear();
        // Delivered last, with the state consistent: a guest continuation running here may post (it
        // is queued) or ask for status (answered directly).
        for (int i = 0; i < _completions.Count; i++)
        {
            (JobCompletion completion, JobOutcome outcome, bool async) = _completions[i];
            if (async)
            {
                ThreadPool.UnsafeQueueUserWorkItem(static s => s.Completion.Complete(s.Outcome), (Completion: completion, Outcome: outcome), preferLocal: false);
            }
            else
            {
                completion.Complete(outcome);
            }
        }
        _completions.Clear();
    }

    private void Submit(Job job)
    {
        if (Stopped)
        {
            Fail(job, Lost("the volume is shutting down"));
            return;
        }
        switch (job.Kind)
        {
            case JobKind.Write or JobKind.Flush when job.Target < 0:
                _admission.Arrive(job);
                break;
            case JobKind.Read when job.Target < 0:
                DispatchGuestRead(job);
                break;
            default:
                DispatchToOne(job);
                break;
        }
    }

    /// <summary>A job that could not be sent anywhere: decided as failed now.</summary>
    internal void Fail(Job job, DownstairsResult why)
    {
        job.Outcome = new JobOutcome(false, why, default, -1);
        job.Sealed = true;
        job.Decided = true;
        Deliver(job);
        TryRetire(job);
    }

    // ------------------------------------------------------------ dispatch

    /// <summary>An admitted write or flush: a new id, sent to every replica taking writes (or queued behind a repair copy).</summary>
    internal void DispatchToAll(Job job)
    {
        job.Id = NextJobId();
        _jobs.Add(job.Id, job);
        if (job.Kind == JobKind.Flush)
        {
            BeginFlush(job);
        }
        else
        {
            MarkDirty(job.FirstBlock, job.Blocks);
        }
        foreach (Replica replica in _replicas)
        {
            if (!replica.ReceivesWrites || replica.Connection is not { } connection)
            {
                MarkMissed(replica, job);
                continue;
            }
            if (job.Kind == JobKind.Flush)
            {
                // A replica under live repair flushes too, so its metadata stays in lockstep with the
                // others; its acks don't count. It leaves the extents still to be copied unstamped
                // (the repair marked them pending on the downstairs), and it is not excused: a
                // refused flush faults it like any other replica.
                Send(replica, connection, job, counted: replica.InService);
                continue;
            }
            if (!WithinBudget(replica, job.Bytes))
            {
                MarkMissed(replica, job); // faulted just now
                continue;
            }
            if (RepairCopies.TryDefer(replica, connection, job))
            {
                continue; // sent after the copy, or marked missed if the copy fails
            }
            (bool send, bool counted) = WriteRole(replica, job.FirstBlock, job.Blocks);
            if (send)
            {
                Send(replica, connection, job, counted);
            }
            else
            {
                MarkMissed(replica, job);
            }
        }
        job.Sealed = true;
        Evaluate(job);
        TryRetire(job);
    }

    /// <summary>A guest read: to the least-loaded replica in service not excluded and not at its job budget.</summary>
    private void DispatchGuestRead(Job job)
    {
        Replica? chosen = null;
        foreach (Replica candidate in _replicas)
        {
            // A replica at its job budget is skipped: more work would only queue behind what it owes.
            if (candidate.InService && candidate.Connection is not null && (job.Exclude & (1 << candidate.Index)) == 0
                && candidate.OutstandingJobs < _options.MaxOutstandingJobs
                && (chosen is null || candidate.OutstandingJobs < chosen.OutstandingJobs))
            {
                chosen = candidate;
            }
        }
        if (chosen is null)
        {
            Fail(job, new DownstairsResult(ResultCode.IoError, 0, $"no replica in service can serve the read of blocks {job.FirstBlock}+{job.Blocks}"));
            return;
        }
        job.Target = chosen.Index;
        DispatchToOne(job);
    }

    /// <summary>A job for one replica: a guest read, or a worker's (repair, scrub, reconciliation) step.</summary>
    private void DispatchToOne(Job job)
    {
        Replica replica = _replicas[job.Target];
        ReplicaConnection? connection = job.TargetConnection ?? replica.Connection;
        if (connection is null || (job.TargetConnection is not null && job.TargetConnection.Closed))
        {
            Fail(job, Lost($"replica {replica.Index} is not connected"));
            return;
        }
        job.Id = NextJobId();
        job.Quorum = 1;
        _jobs.Add(job.Id, job);
        Send(replica, connection, job, counted: true);
        if (job.Kind is JobKind.Read or JobKind.ExtentRead)
        {
            job.SentAt = _time.GetTimestamp();
            _reads.Add(job);
        }
        job.Sealed = true;
    }

    internal void Send(Replica replica, ReplicaConnection connection, Job job, bool counted)
    {
        int r = replica.Index;
        job.Owed[r] = connection;
        job.OwedCount++;
        if (counted)
        {
            job.Counted[r] = true;
            job.Possible++;
        }
        if (replica.Connection == connection)
        {
            replica.Charge(job.Bytes);
        }
        IDownstairs client = connection.Client;
        if (!connection.HasUnflushed)
        {
            // The first request for this connection in this turn: the rest join it, and Settle sends them together.
            connection.HasUnflushed = true;
            client.BeginBatch();
            _touched.Add(connection);
        }
        switch (job.Kind)
        {
            case JobKind.Write:
                client.SubmitWrite(job.Id, job.FirstBlock, job.Payload, job.PayloadHashes);
                break;
            case JobKind.Read:
                client.SubmitRead(job.Id, job.FirstBlock, job.Destination, job.DestinationHashes);
                break;
            case JobKind.Flush:
                client.SubmitFlush(job.Id, job.FlushNumber, Generation);
                break;
            case JobKind.ExtentRead:
                client.SubmitReadExtent(job.Id, job.Range, job.DestinationHashes, job.Destination);
                break;
            case JobKind.ExtentWrite:
                client.SubmitWriteExtent(job.Id, job.Range, job.PayloadHashes, job.Payload);
                break;
            case JobKind.ExtentCommit:
                client.SubmitCommitExtent(job.Id, job.Range.Extent, job.Meta, job.InPlace);
                break;
            case JobKind.MarkPending:
                client.SubmitMarkRepairPending(job.Id, job.Extents!);
                break;
        }
    }

    /// <summary>
    /// What a write means to one replica. In service: sent, and its ack counts. Under live repair,
    /// by the write's extents: all already copied, it is sent and counts (the replica holds them
    /// exactly as one in service does; without this every write during a repair waits for the slower
    /// of the other two); all still to be copied, it is not sent at all (the copy, read from a
    /// replica that has the write, brings it); a mix, sent, not counted. An extent being copied
    /// right now never gets here: its writes are deferred (<see cref="RepairCopies.TryDefer"/>).
    /// </summary>
    private (bool Send, bool Counted) WriteRole(Replica replica, long firstBlock, int blocks)
    {
        if (replica.State != ReplicaState.Repairing)
        {
            return (true, replica.InService);
        }
        int first = (int)(firstBlock / ExtentBlocks);
        int last = (int)((firstBlock + blocks - 1) / ExtentBlocks);
        int pending = 0;
        for (int e = first; e <= last; e++)
        {
            if (replica.PendingRepair.Contains(e))
            {
                pending++;
            }
        }
        return pending == 0 ? (true, true) : pending == last - first + 1 ? (false, false) : (true, false);
    }

    /// <summary>
    /// Budget check at submission. Over budget with two others in service: fault it (never let one
    /// replica hold the other two hostage). With fewer in service, keep it: admission backpressure
    /// and the no-progress watchdog bound it instead.
    /// </summary>
    private bool WithinBudget(Replica replica, long bytes)
    {
        bool over = replica.OutstandingJobs + 1 > _options.MaxOutstandingJobs || replica.OutstandingBytes + bytes > _options.MaxOutstandingBytes;
        if (!over)
        {
            return true;
        }
        if (replica.State == ReplicaState.Repairing || InServiceCount > 2)
        {
            Fault(replica, $"outstanding work over budget ({replica.OutstandingJobs} jobs, {replica.OutstandingBytes} bytes; limits {_options.MaxOutstandingJobs} jobs, {_options.MaxOutstandingBytes} bytes)");
            return false;
        }
        return true;
    }

    /// <summary>
    /// A write the replica will not have (not sent, failed, unanswered or dropped): its catch-up must
    /// copy these blocks. Says so once if this is what overflows the replica's record.
    /// </summary>
    internal void MarkMissed(Replica replica, Job job)
    {
        if (job.Kind != JobKind.Write)
        {
            return;
        }
        if (replica.State != ReplicaState.Repairing)
        {
            // Under repair, a write is missed only in extents the repair has yet to copy (they are
            // pending already); out of service, its extents are copied by the next repair whatever
            // their metadata says (a flush may stamp them current meanwhile).
            AddExtents(replica.PendingRepair, job);
        }
        if (!replica.Changes.Mark(job.FirstBlock, job.Blocks))
        {
            EngineLog.ChangeRecordDropped(_logger, replica.Index, replica.Changes.LostReason ?? "", (long)ExtentBlocks * BlockSize / 1048576.0);
        }
    }

    private void MarkDirty(long firstBlock, int blocks)
    {
        int first = (int)(firstBlock / ExtentBlocks);
        int last = (int)((firstBlock + blocks - 1) / ExtentBlocks);
        for (int e = first; e <= last; e++)
        {
            _dirty.Add(e);
        }
    }

    private void AddExtents(HashSet<int> extents, Job job)
    {
        for (long e = job.FirstBlock / ExtentBlocks; e <= (job.EndBlock - 1) / ExtentBlocks; e++)
        {
            extents.Add((int)e);
        }
    }

    private void BeginFlush(Job job)
    {
        job.FlushNumber = ++FlushNumber;
        job.FlushedExtents = [.. _dirty];
        _dirty.Clear();
        _flushing[job.FlushNumber] = job.FlushedExtents;
    }

    // ------------------------------------------------------------ replies

    private void Reply(ReplicaConnection from, ulong jobId, DownstairsResult result, ExtentMeta meta)
    {
        int r = from.Replica;
        if (!_jobs.TryGetValue(jobId, out Job? job) || job.Owed[r] != from)
        {
            // The client matches replies to what it sent; this cannot be a peer's doing. Ignore it.
            return;
        }
        job.Owed[r] = null;
        job.OwedCount--;
        Replica replica = _replicas[r];
        bool current = replica.Connection == from;
        if (current)
        {
            replica.Complete(job.Bytes, result.IsOk);
        }
        switch (job.Kind)
        {
            case JobKind.Write or JobKind.Flush when job.Quorum == 2:
                if (job.Counted[r])
                {
                    job.Counted[r] = false;
                    if (result.IsOk)
                    {
                        job.Acks++;
                    }
                    else
                    {
                        job.Possible--;
                    }
                }
                if (current && !result.IsOk)
                {
                    if (job.Kind == JobKind.Write)
                    {
                        AddExtents(replica.PendingRepair, job);
                        MarkMissed(replica, job);
                    }
                    string what = job.Kind == JobKind.Flush ? "flush" : "write";
                    Fault(replica, result.IsLinkFailure ? $"connection lost during {what}: {result.Message}" : $"{what} failed: {result}");
                }
                if (!job.Decided && !result.IsOk && job.Outcome.Result.IsOk)
                {
                    job.Outcome = job.Outcome with { Result = result, Replica = r };
                }
                break;
            default:
                if (!job.Decided)
                {
                    bool handOver = result.IsOk && job.Kind is JobKind.Read or JobKind.ExtentRead;
                    job.Outcome = new JobOutcome(result.IsOk, result, meta, r)
                    {
                        Data = handOver ? job.OwnedData : null,
                        Hashes = handOver ? job.OwnedHashes : null,
                    };
                    if (handOver)
                    {
                        job.OwnedData = null;
                        job.OwnedHashes = null;
                    }
                    job.Acks = result.IsOk ? 1 : 0;
                    job.Possible = job.Acks;
                }
                if (current && result.IsLinkFailure)
                {
                    Fault(replica, $"connection lost during {job.Kind}: {result.Message}");
                }
                break;
        }
        Evaluate(job);
        TryRetire(job);
    }

    /// <summary>Decides a job once enough replicas answered (a quorum succeeded or can no longer).</summary>
    internal void Evaluate(Job job)
    {
        if (job.Decided || !job.Sealed)
        {
            return;
        }
        bool ok;
        if (job.Acks >= job.Quorum)
        {
            ok = true;
        }
        else if (job.Possible < job.Quorum)
        {
            ok = false;
        }
        else
        {
            return;
        }
        job.Decided = true;
        if (job.Quorum == 2)
        {
            job.Outcome = job.Outcome with { Ok = ok };
        }
        if (job.Kind == JobKind.Flush && job.Quorum == 2)
        {
            EndFlush(job, ok);
        }
        if (job.Kind is JobKind.Read or JobKind.ExtentRead)
        {
            _reads.Remove(job);
        }
        if (!job.CallerMemory)
        {
            Deliver(job);
        }
    }

    private void EndFlush(Job job, bool ok)
    {
        _flushing.Remove(job.FlushNumber);
        if (ok)
        {
            foreach (int extent in job.FlushedExtents!)
            {
                Expected[extent] = new ExtentMeta(Generation, job.FlushNumber, false);
            }
        }
        else
        {
            _dirty.UnionWith(job.FlushedExtents!);
        }
    }

    private void Deliver(Job job)
    {
        if (job.Completion is { } completion)
        {
            job.Completion = null;
            _completions.Add((completion, job.Outcome, completion.RunAsync));
        }
    }

    /// <summary>Once decided and answered by every replica it went to, the job's memory goes back.</summary>
    internal void TryRetire(Job job)
    {
        if (!job.Decided || job.OwedCount > 0 || job.DeferredCount > 0)
        {
            return;
        }
        if (job.Id != 0)
        {
            _jobs.Remove(job.Id);
        }
        Deliver(job); // a job with caller memory is told now
        job.ReturnBuffers();
        JobPool.Return(job);
    }

    // ------------------------------------------------------------ faults

    /// <summary>
    /// Takes a replica out of service: its jobs stop counting (they are decided by the other two),
    /// its connection is closed (which answers each of them with a failure once the memory is free),
    /// its maintainer is woken to reconnect and repair.
    /// </summary>
    public void Fault(Replica replica, string reason)
    {
        int jobs = replica.OutstandingJobs;
        long bytes = replica.OutstandingBytes;
        ReplicaConnection? connection = replica.Connection;
        if (!replica.Fault(reason, FlapWindow, _options.ReconnectInitialDelay, _options.ReconnectMaxDelay, out bool flapping))
        {
            return;
        }
        int r = replica.Index;
        // What it may hold wrongly whatever its metadata will say: a write it failed or never
        // answered can sit under a flush it applied meanwhile, which stamps the extent current
        // with the same (generation, flush number) as the healthy replicas. Its repair copies
        // these extents regardless (found by the model test).
        foreach (List<int> flushing in _flushing.Values)
        {
            replica.PendingRepair.UnionWith(flushing);
        }
        List<Job>? decided = null;
        foreach (Job job in _jobs.Values)
        {
            if (job.Owed[r] is not null)
            {
                MarkMissed(replica, job); // a write it may not have applied
            }
            if (job.Owed[r] is null || job.Decided)
            {
                continue;
            }
            if (job.Quorum == 2 && job.Counted[r])
            {
                job.Counted[r] = false;
                job.Possible--;
                (decided ??= []).Add(job);
            }
            else if (job.Quorum == 1 && job.Target == r)
            {
                // A read or a worker's step on the faulted connection: decided now (the memory stays held until the reply).
                job.Outcome = new JobOutcome(false, Lost($"replica {r} faulted: {reason}"), default, r);
                job.Possible = 0;
                (decided ??= []).Add(job);
            }
        }
        RepairCopies.Drop(replica);
        if (decided is not null)
        {
            foreach (Job job in decided)
            {
                Evaluate(job);
            }
        }
        int inService = InServiceCount;
        if (flapping)
        {
            _throttle.Report(LogLevel.Warning, $"Replica {r} ({replica.EndPoint}) faulted again", () => $"{reason}; reconnecting in {replica.ReconnectDelay.TotalMilliseconds:0} ms");
        }
        else
        {
            EngineLog.Faulted(_logger, r, replica.EndPoint.ToString(), reason, jobs, bytes, inService);
        }
        if (inService < 2)
        {
            EngineLog.Degraded(_logger, inService);
        }
        if (connection is not null)
        {
            Close(connection);
        }
        RequestConnection(r);
    }

    /// <summary>Closes a connection off the loop; its pending jobs are answered with failures as it goes.</summary>
    public void Close(ReplicaConnection connection)
    {
        if (connection.Closed)
        {
            return;
        }
        connection.Closed = true;
        // Started here (closing the socket is immediate), finished off the loop: its pending jobs
        // are answered with failures as it goes, which only queues events.
        ValueTask closing = connection.Client.DisposeAsync();
        if (!closing.IsCompleted)
        {
            _ = closing.AsTask().ContinueWith(static t => _ = t.Exception, TaskContinuationOptions.OnlyOnFaulted);
        }
    }

    public void RequestConnection(int replica)
    {
        try
        {
            if (Reconnect[replica].CurrentCount == 0)
            {
                Reconnect[replica].Release();
            }
        }
        catch (SemaphoreFullException)
        {
        }
    }

    /// <summary>A job ended without its replica's answer (the link or the volume is gone).</summary>
    internal static DownstairsResult Lost(string why) => DownstairsResult.Lost(new DownstairsConnectionException(why));

    // ------------------------------------------------------------ tick

    private void Tick()
    {
        long now = _time.GetTimestamp();
        double seconds = _time.GetElapsedTime(_lastTick, now).TotalSeconds;
        _lastTick = now;
        foreach (Replica replica in _replicas)
        {
            if (seconds > 0)
            {
                replica.CompletedPerSecond = (replica.Completed - replica.CompletedAtLastSample) / seconds;
            }
            replica.CompletedAtLastSample = replica.Completed;
            if (replica.ReceivesWrites && replica.OutstandingJobs > 0 && _time.GetElapsedTime(replica.LastProgress, now) > _options.NoProgressTimeout)
            {
                Fault(replica, $"no progress for {_options.NoProgressTimeout.TotalSeconds:0.#} s with {replica.OutstandingJobs} jobs outstanding");
            }
        }
        // A read not answered in time is given up (the guest tries another replica); its memory stays
        // with the job until the replica answers or its connection ends.
        for (int i = _reads.Count - 1; i >= 0; i--)
        {
            Job read = _reads[i];
            // Extent reads (repair, scrub) move whole chunks: they get five times as long.
            TimeSpan limit = read.Kind == JobKind.Read ? _options.ReadAttemptTimeout : _options.ReadAttemptTimeout * 5;
            if (!read.Decided && _time.GetElapsedTime(read.SentAt, now) > limit)
            {
                read.Outcome = new JobOutcome(false, new DownstairsResult(ResultCode.IoError, 0, $"no answer within {limit.TotalMilliseconds:0} ms"), default, read.Target, TimedOut: true);
                read.Possible = 0;
                Evaluate(read);
            }
        }
        _admission.CheckDeadlines(now);
    }

    // ------------------------------------------------------------ shutdown and status

    /// <summary>Stops taking jobs and closes every connection (their jobs fail).</summary>
    public List<ReplicaConnection> Stop()
    {
        Stopped = true;
        _tick?.Dispose();
        _admission.FailAll(Lost("the volume is shutting down"));
        var connections = new List<ReplicaConnection>();
        foreach (Replica replica in _replicas)
        {
            if (replica.Connection is { } c)
            {
                connections.Add(c);
                c.Closed = true;
            }
            replica.Detach();
        }
        return connections;
    }

    public (int Jobs, long Bytes) Deferred(Replica replica) => RepairCopies.Deferred(replica);

    /// <summary>The loop's state in one line (for a diagnosis: what a stuck operation waits for).</summary>
    public string Describe() =>
        $"{_jobs.Count} jobs in flight ({string.Join(", ", _jobs.Values.Take(8).Select(j => $"#{j.Id} {j.Kind} blocks {j.FirstBlock}+{j.Blocks} decided={j.Decided} owed={j.OwedCount} deferred={j.DeferredCount} acks={j.Acks}/{j.Possible}"))}), "
        + $"{_admission.Parked} parked, range locked: {_rangeLocks.Overlaps(0, long.MaxValue)}, replicas: {string.Join("; ", _replicas.Select(r => $"{r.Index} {r.State} jobs={r.OutstandingJobs} pending={r.PendingRepair.Count}"))}";

    public ReplicaStatus[] ReplicaStatuses() => [.. _replicas.Select(r => r.Status())];

    public int OutstandingJobs => _jobs.Count;
}

internal enum EventKind : byte
{
    Submit,
    Reply,
    Tick,
    AdmissionDue,
    Invoke,
}

/// <summary>One event for the loop; a struct, so posting a reply allocates nothing.</summary>
internal readonly record struct EngineEvent(EventKind Kind, Job? Job)
{
    public ReplicaConnection? From { get; init; }

    public ulong JobId { get; init; }

    public DownstairsResult Result { get; init; }

    public ExtentMeta Meta { get; init; }

    public Action? Work { get; init; }
}

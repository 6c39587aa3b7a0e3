using System.Buffers;
using System.Collections.Concurrent;
using System.Threading.Tasks.Sources;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

internal enum JobKind : byte
{
    Write,
    Read,
    Flush,
    ExtentRead,
    ExtentWrite,
    ExtentCommit,
    MarkPending,
}

/// <summary>How a job ended, as its submitter sees it.</summary>
internal readonly record struct JobOutcome(bool Ok, DownstairsResult Result, ExtentMeta Meta, int Replica, bool TimedOut = false)
{
    /// <summary>For reads: the engine's buffers holding the data and hashes, now the caller's to return to the pool.</summary>
    public byte[]? Data { get; init; }

    public byte[]? Hashes { get; init; }

    public bool ConnectionLost => Result.IsLinkFailure;
}

/// <summary>
/// One job: an id, what it asks, the memory it sends or fills, and its progress across the replicas
/// it went to. Owned by the loop once posted; pooled (a 4k write allocates no job).
/// </summary>
/// <remarks>
/// Two moments matter. <b>Decided</b>: enough replicas answered (a quorum of the counted ones
/// succeeded, or can no longer) — the submitter is told then, so a guest write is acknowledged
/// by two replicas without waiting for the third. <b>Retired</b>: every replica it was sent to has
/// answered (a faulted replica's connection answers with a failure once it has stopped using the
/// memory) — only then does the memory go back to the pool. A job whose memory belongs to its
/// submitter is told at retirement, never before, so that memory is never reused while a sender may
/// still read it.
/// </remarks>
internal sealed class Job
{
    public const int MaxReplicas = 3;

    public ulong Id { get; set; }

    public JobKind Kind { get; set; }

    public long FirstBlock { get; set; }

    public int Blocks { get; set; }

    /// <summary>Payload or destination bytes (budget accounting).</summary>
    public int Bytes { get; set; }

    /// <summary>Pooled buffers the job owns (returned at retirement unless handed to the submitter).</summary>
    public byte[]? OwnedData { get; set; }

    public byte[]? OwnedHashes { get; set; }

    public ReadOnlyMemory<byte> Payload { get; set; }

    public ReadOnlyMemory<byte> PayloadHashes { get; set; }

    public Memory<byte> Destination { get; set; }

    public Memory<byte> DestinationHashes { get; set; }

    public ExtentRange Range { get; set; }

    public ExtentMeta Meta { get; set; }

    /// <summary>ExtentCommit: the blocks were written in place (a catch-up copy), nothing was staged.</summary>
    public bool InPlace { get; set; }

    public IReadOnlyList<int>? Extents { get; set; }

    public ulong FlushNumber { get; set; }

    /// <summary>Flush: the extents it stamps once durable on two.</summary>
    public List<int>? FlushedExtents { get; set; }

    /// <summary>Replica-independent: only this replica (−1: every replica taking writes).</summary>
    public int Target { get; set; } = -1;

    /// <summary>Only via this connection (a repair's target or source); null: the replica's current one.</summary>
    public ReplicaConnection? TargetConnection { get; set; }

    /// <summary>The submitter's memory is in the job: tell it at retirement, not at the decision.</summary>
    public bool CallerMemory { get; set; }

    /// <summary>An RMW or read repair holding the range lock itself: not held back by it.</summary>
    public bool HoldsRangeLock { get; set; }

    /// <summary>Admission: not before this timestamp (backpressure), failed after <see cref="AdmitDeadline"/> (too few replicas).</summary>
    public long NotBefore { get; set; }

    public long AdmitDeadline { get; set; }

    /// <summary>Read attempts: sent at (for the tick's deadline) and not yet timed out.</summary>
    public long SentAt { get; set; }

    public int Quorum { get; set; } = 2;

    /// <summary>Reads: replicas not to choose (bit per replica), e.g. those already tried.</summary>
    public int Exclude { get; set; }

    public JobCompletion? Completion { get; set; }

    /// <summary>Per replica: the connection it was sent to and still owes a reply (null: none owed).</summary>
    public ReplicaConnection?[] Owed { get; } = new ReplicaConnection?[MaxReplicas];

    public bool[] Counted { get; } = new bool[MaxReplicas];

    public int OwedCount { get; set; }

    /// <summary>Writes queued behind a repair copy (not sent yet), one per replica at most.</summary>
    public int DeferredCount { get; set; }

    public int Possible { get; set; }

    public int Acks { get; set; }

    public bool Decided { get; set; }

    public bool Sealed { get; set; }

    public JobOutcome Outcome { get; set; }

    public void Reset()
    {
        Id = 0;
        FirstBlock = 0;
        Blocks = 0;
        Bytes = 0;
        OwnedData = null;
        OwnedHashes = null;
        Payload = default;
        PayloadHashes = default;
        Destination = default;
        DestinationHashes = default;
        Range = default;
        Meta = default;
        InPlace = false;
        Extents = null;
        FlushNumber = 0;
        FlushedExtents = null;
        Target = -1;
        TargetConnection = null;
        CallerMemory = false;
        HoldsRangeLock = false;
        NotBefore = 0;
        AdmitDeadline = 0;
        SentAt = 0;
        Quorum = 2;
        Exclude = 0;
        Completion = null;
        Array.Clear(Owed);
        Array.Clear(Counted);
        OwedCount = 0;
        DeferredCount = 0;
        Possible = 0;
        Acks = 0;
        Decided = false;
        Sealed = false;
        Outcome = default;
    }

    /// <summary>Blocks [<see cref="FirstBlock"/>, end) it writes or reads.</summary>
    public long EndBlock => FirstBlock + Blocks;

    public bool Overlaps(long first, long end) => FirstBlock < end && first < EndBlock;

    public void ReturnBuffers()
    {
        if (OwnedData is not null)
        {
            ArrayPool<byte>.Shared.Return(OwnedData);
            OwnedData = null;
        }
        if (OwnedHashes is not null)
        {
            ArrayPool<byte>.Shared.Return(OwnedHashes);
            OwnedHashes = null;
        }
    }
}

/// <summary>
/// What a submitter awaits: a pooled <see cref="IValueTaskSource{T}"/>, completed by the loop. The
/// continuation runs inline on the loop's thread (after the event that completed it), so a guest's
/// reply is sent without a hand-off to another thread.
/// </summary>
internal sealed class JobCompletion : IValueTaskSource<JobOutcome>
{
    private static readonly BoundedPool<JobCompletion> Pool = new(1024);
    private ManualResetValueTaskSourceCore<JobOutcome> _core;

    public static JobCompletion Rent() => Pool.TryRent() ?? new JobCompletion();

    public ValueTask<JobOutcome> Task => new(this, _core.Version);

    /// <summary>Complete on the thread pool rather than inline on the loop (workers: their next step may be long).</summary>
    public bool RunAsync { get; set; }

    public void Complete(JobOutcome outcome) => _core.SetResult(outcome);

    public JobOutcome GetResult(short token)
    {
        try
        {
            return _core.GetResult(token);
        }
        finally
        {
            _core.Reset();
            RunAsync = false;
            Pool.Return(this);
        }
    }

    public ValueTaskSourceStatus GetStatus(short token) => _core.GetStatus(token);

    public void OnCompleted(Action<object?> continuation, object? state, short token, ValueTaskSourceOnCompletedFlags flags) =>
        _core.OnCompleted(continuation, state, token, flags);
}

/// <summary>Jobs are rented by submitters on any thread and returned by the loop.</summary>
internal static class JobPool
{
    private static readonly BoundedPool<Job> Pool = new(2048);

    public static Job Rent() => Pool.TryRent() ?? new Job();

    public static void Return(Job job)
    {
        job.Reset();
        Pool.Return(job);
    }
}

/// <summary>
/// A thread-safe pool holding at most <c>limit</c> objects. Its own count, because
/// <see cref="ConcurrentQueue{T}.Count"/> across segments freezes them for observation, after
/// which every enqueue allocates a new segment: a pool that allocates.
/// </summary>
internal sealed class BoundedPool<T>(int limit) where T : class
{
    private readonly ConcurrentQueue<T> _items = new();
    private int _count;

    public T? TryRent()
    {
        if (_items.TryDequeue(out T? item))
        {
            Interlocked.Decrement(ref _count);
            return item;
        }
        return null;
    }

    public void Return(T item)
    {
        if (Interlocked.Increment(ref _count) <= limit)
        {
            _items.Enqueue(item);
        }
        else
        {
            Interlocked.Decrement(ref _count);
        }
    }
}

using System.Buffers;

using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The steps background workers (reconciliation, live repair, scrub) ask of one connection. Each is
/// a job posted to the loop and completed off it; a read hands its pooled buffers to the caller, a
/// write of the caller's memory completes only once the connection is done with that memory.
/// </summary>
internal static class WorkerJobs
{
    public static ValueTask<JobOutcome> ReadExtentAsync(this Engine engine, ReplicaConnection from, int extent, int firstBlock, int count)
    {
        Job job = JobPool.Rent();
        job.Kind = JobKind.ExtentRead;
        job.Target = from.Replica;
        job.TargetConnection = from;
        job.Range = new ExtentRange(extent, firstBlock, count);
        job.Bytes = count * engine.BlockSize;
        job.OwnedData = ArrayPool<byte>.Shared.Rent(job.Bytes);
        job.OwnedHashes = ArrayPool<byte>.Shared.Rent(count * BlockContext.Size);
        job.Destination = job.OwnedData.AsMemory(0, job.Bytes);
        job.DestinationHashes = job.OwnedHashes.AsMemory(0, count * BlockContext.Size);
        return engine.RunAsync(job);
    }

    public static ValueTask<JobOutcome> WriteExtentAsync(this Engine engine, ReplicaConnection to, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data)
    {
        Job job = JobPool.Rent();
        job.Kind = JobKind.ExtentWrite;
        job.Target = to.Replica;
        job.TargetConnection = to;
        job.Range = range;
        job.Bytes = data.Length;
        job.Payload = data;
        job.PayloadHashes = contexts;
        job.CallerMemory = true;
        return engine.RunAsync(job);
    }

    public static ValueTask<JobOutcome> CommitExtentAsync(this Engine engine, ReplicaConnection to, int extent, ExtentMeta meta, bool inPlace)
    {
        Job job = JobPool.Rent();
        job.Kind = JobKind.ExtentCommit;
        job.Target = to.Replica;
        job.TargetConnection = to;
        job.Range = new ExtentRange(extent, 0, 0);
        job.Meta = meta;
        job.InPlace = inPlace;
        return engine.RunAsync(job);
    }

    public static ValueTask<JobOutcome> MarkRepairPendingAsync(this Engine engine, ReplicaConnection to, IReadOnlyList<int> extents)
    {
        Job job = JobPool.Rent();
        job.Kind = JobKind.MarkPending;
        job.Target = to.Replica;
        job.TargetConnection = to;
        job.Extents = extents;
        return engine.RunAsync(job);
    }

    public static ValueTask<JobOutcome> FlushOneAsync(this Engine engine, ReplicaConnection to, ulong flushNumber)
    {
        Job job = JobPool.Rent();
        job.Kind = JobKind.Flush;
        job.Target = to.Replica;
        job.TargetConnection = to;
        job.FlushNumber = flushNumber;
        return engine.RunAsync(job);
    }

    /// <summary>Returns a read's buffers (handed over with a successful outcome) to the pool.</summary>
    public static void ReturnBuffers(this JobOutcome outcome)
    {
        if (outcome.Data is not null)
        {
            ArrayPool<byte>.Shared.Return(outcome.Data);
        }
        if (outcome.Hashes is not null)
        {
            ArrayPool<byte>.Shared.Return(outcome.Hashes);
        }
    }
}

/// <summary>A repair source failed or lied: the copy tries another source.</summary>
internal sealed class RepairSourceException(string message) : Exception(message);

/// <summary>
/// Copies one extent between replicas, whole (staged, then swapped in by the commit) or only the
/// granules a changed-block record marked (written in place, then made durable by the commit).
/// Reconciliation and live repair share it. Chunks of one extent travel in groups: the group's
/// reads go out together, then its writes, so one extent keeps a link busy without a round trip
/// per chunk.
/// </summary>
internal static class ExtentCopier
{
    /// <summary>Most chunks of one extent in flight at once.</summary>
    private const int GroupChunks = 2;

    /// <summary>Most ranges in one group when a record's granules are small and scattered.</summary>
    private const int GroupRanges = 64;

    /// <summary>Where a copy reports its progress (bytes copied) and asks its pace (may be null: flat out).</summary>
    internal interface IPacing
    {
        ValueTask BeforeAsync(long bytes, CancellationToken cancellationToken);

        ValueTask AfterAsync(long bytes, long started, CancellationToken cancellationToken);
    }

    /// <summary>
    /// Copies one extent whole, then commits it with the source's metadata — only if that metadata is
    /// no newer than <paramref name="expected"/> (what the source reported at activation) or, when
    /// null, than the engine's own generation and flush number (read after the reply: every number a
    /// flush stamps was taken from the counter before it was sent). The commit plants the metadata on
    /// the target, so a source lying here could plant a number nobody can step past.
    /// </summary>
    public static Task CopyAsync(Engine engine, ReplicaConnection source, ReplicaConnection target, int extent, ExtentMeta? expected,
        IPacing? pacing = null, Action? committing = null, CancellationToken cancellationToken = default)
    {
        int chunkBlocks = ChunkBlocks(engine);
        var ranges = new List<(int FirstBlock, int Count)>();
        for (int first = 0; first < engine.ExtentBlocks; first += chunkBlocks)
        {
            ranges.Add((first, Math.Min(chunkBlocks, engine.ExtentBlocks - first)));
        }
        return CopyRangesAsync(engine, source, target, extent, ranges, inPlace: false, expected, pacing, committing, cancellationToken);
    }

    /// <summary>
    /// Catch-up: copies only the granules in <paramref name="granules"/> (null: none, the extent only
    /// needs the source's metadata), in place, then commits in place.
    /// </summary>
    public static Task CatchUpAsync(Engine engine, ReplicaConnection source, ReplicaConnection target, int extent, ulong[]? granules, int granuleBlocks,
        IPacing? pacing = null, Action? committing = null, Action? probing = null, CancellationToken cancellationToken = default)
    {
        List<(int FirstBlock, int Count)> ranges = granules is null ? [] : ChangeRecord.Runs(granules, granuleBlocks, engine.ExtentBlocks, ChunkBlocks(engine));
        return CopyRangesAsync(engine, source, target, extent, ranges, inPlace: true, null, pacing, committing, cancellationToken, probing);
    }

    private static int ChunkBlocks(Engine engine) => Math.Max(1, Math.Min(engine.ExtentBlocks, engine.Options.RepairChunkBytes / engine.BlockSize));

    private static async Task CopyRangesAsync(Engine engine, ReplicaConnection source, ReplicaConnection target, int extent,
        List<(int FirstBlock, int Count)> ranges, bool inPlace, ExtentMeta? expected, IPacing? pacing, Action? committing, CancellationToken cancellationToken, Action? probing = null)
    {
        ExtentMeta meta = default;
        (long Bytes, long Started)? lastGroup = null;
        if (ranges.Count == 0 && expected is not null)
        {
            // Nothing to copy, but the commit needs the source's metadata: one block's read brings it.
            JobOutcome probe = await engine.ReadExtentAsync(source, extent, 0, 1);
            try
            {
                meta = await CheckedMetaAsync(engine, probe, extent, expected);
            }
            finally
            {
                probe.ReturnBuffers();
            }
        }
        else if (ranges.Count > 0)
        {
            long groupLimit = (long)GroupChunks * ChunkBlocks(engine);
            var reads = new List<ValueTask<JobOutcome>>(GroupRanges);
            var outcomes = new List<JobOutcome>(GroupRanges);
            var writes = new List<ValueTask<JobOutcome>>(GroupRanges);
            for (int next = 0; next < ranges.Count;)
            {
                cancellationToken.ThrowIfCancellationRequested();
                int end = next;
                long blocks = 0;
                while (end < ranges.Count && end - next < GroupRanges && (end == next || blocks + ranges[end].Count <= groupLimit))
                {
                    blocks += ranges[end].Count;
                    end++;
                }
                long bytes = blocks * engine.BlockSize;
                if (pacing is not null)
                {
                    await pacing.BeforeAsync(bytes, cancellationToken);
                }
                long started = engine.Time.GetTimestamp();
                reads.Clear();
                outcomes.Clear();
                writes.Clear();
                for (int i = next; i < end; i++)
                {
                    reads.Add(engine.ReadExtentAsync(source, extent, ranges[i].FirstBlock, ranges[i].Count));
                }
                int readsAwaited = 0;
                int writesAwaited = 0;
                try
                {
                    while (readsAwaited < reads.Count)
                    {
                        outcomes.Add(await reads[readsAwaited++]);
                    }
                    foreach (JobOutcome outcome in outcomes)
                    {
                        // The last read's metadata is the newest (the reads were sent in order).
                        meta = await CheckedMetaAsync(engine, outcome, extent, expected);
                    }
                    // Written in range order: the first staged chunk carries "begin", which discards
                    // an older staging copy, and the connection keeps the order.
                    for (int i = 0; i < outcomes.Count; i++)
                    {
                        (int first, int count) = ranges[next + i];
                        uint flags = inPlace ? ExtentRange.InPlaceFlag : first == 0 ? ExtentRange.BeginFlag : 0;
                        writes.Add(engine.WriteExtentAsync(target, new ExtentRange(extent, first, count, flags),
                            outcomes[i].Hashes.AsMemory(0, count * BlockContext.Size), outcomes[i].Data.AsMemory(0, count * engine.BlockSize)));
                    }
                    while (writesAwaited < writes.Count)
                    {
                        JobOutcome written = await writes[writesAwaited++];
                        if (!written.Ok)
                        {
                            throw new InvalidOperationException($"repair write of extent {extent} failed: {written.Result}");
                        }
                    }
                }
                finally
                {
                    // A write of these buffers is told only once its connection let go of them; one not
                    // awaited yet (an earlier step threw) must be, before the buffers go back to the pool.
                    while (writesAwaited < writes.Count)
                    {
                        await writes[writesAwaited++];
                    }
                    while (readsAwaited < reads.Count)
                    {
                        outcomes.Add(await reads[readsAwaited++]);
                    }
                    foreach (JobOutcome outcome in outcomes)
                    {
                        outcome.ReturnBuffers();
                    }
                }
                if (pacing is not null && end < ranges.Count)
                {
                    await pacing.AfterAsync(bytes, started, cancellationToken);
                }
                else
                {
                    // The last group's pause comes after the commit: a pause here would hold the
                    // extent's writes back (and let flushes pass them) for nothing.
                    lastGroup = (bytes, started);
                }
                next = end;
            }
        }
        JobOutcome committed = expected is null
            ? await CommitWithFreshMetaAsync(engine, source, target, extent, inPlace, committing, probing)
            : await engine.CommitExtentAsync(target, extent, meta, inPlace);
        if (!committed.Ok)
        {
            throw new InvalidOperationException($"repair commit of extent {extent} failed: {committed.Result}");
        }
        if (pacing is not null && lastGroup is { } group)
        {
            await pacing.AfterAsync(group.Bytes, group.Started, cancellationToken);
        }
    }

    /// <summary>Attempts at a metadata read no flush overtakes before the commit is sent.</summary>
    private const int FreshMetaAttempts = 8;

    /// <summary>
    /// Live repair: commits the source's metadata as it is now. The target's flushes leave the extent
    /// unstamped until the commit, so a flush that stamped the source between the metadata read and
    /// the commit would be missing on the target (the copies would agree in data and differ in
    /// metadata, and be copied again at the next repair). A flush dispatched between the two is
    /// noticed in the loop, and the metadata read again.
    /// </summary>
    private static async ValueTask<JobOutcome> CommitWithFreshMetaAsync(Engine engine, ReplicaConnection source, ReplicaConnection target, int extent, bool inPlace, Action? committing, Action? probing)
    {
        for (int attempt = 1; ; attempt++)
        {
            (ulong flushAtRead, ValueTask<JobOutcome> reading) = await engine.InvokeAsync(() =>
            {
                if (inPlace)
                {
                    probing?.Invoke();
                }
                return (engine.FlushNumber, engine.ReadExtentAsync(source, extent, 0, 1));
            });
            JobOutcome probe = await reading;
            ExtentMeta meta;
            try
            {
                meta = await CheckedMetaAsync(engine, probe, extent, null);
            }
            finally
            {
                probe.ReturnBuffers();
            }
            ValueTask<JobOutcome>? commit = await engine.InvokeAsync(() =>
            {
                bool overtaken = engine.FlushNumber != flushAtRead;
                if (overtaken && attempt < FreshMetaAttempts)
                {
                    return (ValueTask<JobOutcome>?)null;
                }
                // Still overtaken on the last attempt (flushes faster than a round trip to the source):
                // committed dirty, so the metadata read is not recorded as current; the target's next
                // flush stamps the extent, and a comparison of metadata copies it again if they differ.
                ValueTask<JobOutcome> sent = engine.CommitExtentAsync(target, extent, overtaken ? meta with { Dirty = true } : meta, inPlace);
                committing?.Invoke(); // in this same turn: nothing can come between the commit and what follows it
                return sent;
            });
            if (commit is { } sent)
            {
                return await sent;
            }
        }
    }

    private static async ValueTask<ExtentMeta> CheckedMetaAsync(Engine engine, JobOutcome read, int extent, ExtentMeta? expected)
    {
        if (!read.Ok)
        {
            throw new RepairSourceException(read.Result.ToString());
        }
        ExtentMeta meta = read.Meta;
        ExtentMeta limit = expected ?? await engine.InvokeAsync(() => new ExtentMeta(engine.Generation, engine.FlushNumber, false));
        if (meta.Generation > limit.Generation || meta.FlushNumber > limit.FlushNumber)
        {
            throw new RepairSourceException($"misbehaving replica: extent {extent} read back as generation {meta.Generation} flush {meta.FlushNumber}, newer than generation {limit.Generation} flush {limit.FlushNumber}, the most it can hold");
        }
        return meta;
    }
}

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

    public static ValueTask<JobOutcome> CommitExtentAsync(this Engine engine, ReplicaConnection to, int extent, ExtentMeta meta)
    {
        Job job = JobPool.Rent();
        job.Kind = JobKind.ExtentCommit;
        job.Target = to.Replica;
        job.TargetConnection = to;
        job.Range = new ExtentRange(extent, 0, 0);
        job.Meta = meta;
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

/// <summary>Copies one extent between replicas (reconciliation and live repair share it).</summary>
internal static class ExtentCopier
{
    /// <summary>
    /// Copies one extent, chunk by chunk (contexts and data as stored), then commits it with the
    /// source's metadata — only if that metadata is no newer than <paramref name="expected"/> (what the
    /// source reported at activation) or, when null, than the engine's own generation and flush number
    /// (read after the reply: every number a flush stamps was taken from the counter before it was
    /// sent). The commit plants the metadata on the target, so a source lying here could plant a
    /// number nobody can step past.
    /// </summary>
    public static async Task CopyAsync(Engine engine, ReplicaConnection source, ReplicaConnection target, int extent, ExtentMeta? expected)
    {
        int extentBlocks = engine.ExtentBlocks;
        int chunkBlocks = Math.Max(1, Math.Min(extentBlocks, engine.Options.RepairChunkBytes / engine.BlockSize));
        ExtentMeta meta = default;
        for (int first = 0; first < extentBlocks; first += chunkBlocks)
        {
            int count = Math.Min(chunkBlocks, extentBlocks - first);
            JobOutcome read = await engine.ReadExtentAsync(source, extent, first, count);
            try
            {
                if (!read.Ok)
                {
                    throw new RepairSourceException(read.Result.ToString());
                }
                meta = read.Meta;
                ExtentMeta limit = expected ?? await engine.InvokeAsync(() => new ExtentMeta(engine.Generation, engine.FlushNumber, false));
                if (meta.Generation > limit.Generation || meta.FlushNumber > limit.FlushNumber)
                {
                    throw new RepairSourceException($"misbehaving replica: extent {extent} read back as generation {meta.Generation} flush {meta.FlushNumber}, newer than generation {limit.Generation} flush {limit.FlushNumber}, the most it can hold");
                }
                JobOutcome written = await engine.WriteExtentAsync(target, new ExtentRange(extent, first, count, first == 0 ? ExtentRange.BeginFlag : 0),
                    read.Hashes.AsMemory(0, count * BlockContext.Size), read.Data.AsMemory(0, count * engine.BlockSize));
                if (!written.Ok)
                {
                    throw new InvalidOperationException($"repair write of extent {extent} failed: {written.Result}");
                }
            }
            finally
            {
                read.ReturnBuffers();
            }
        }
        JobOutcome committed = await engine.CommitExtentAsync(target, extent, meta);
        if (!committed.Ok)
        {
            throw new InvalidOperationException($"repair commit of extent {extent} failed: {committed.Result}");
        }
    }
}

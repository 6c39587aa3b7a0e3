using System.Buffers.Binary;

using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The scrub: every block of every replica in service, checked against its own stored hash. A guest
/// read checks only the one copy it reads, so rot in a copy nobody reads stays until a scrub: it
/// reads each chunk from every replica in service and rewrites bad blocks from a good copy. Guest
/// IO continues; the scrub paces itself. A worker: it asks the loop for everything it does.
/// </summary>
internal sealed class Scrubber(ReplicatedVolume volume, Engine engine)
{
    private readonly Lock _statusGate = new();
    private Task? _running;
    private ScrubStatus _status = new(false, 0, 0, 0, 0, null);
    private long _checkedTotal;
    private long _repairedTotal;

    /// <summary>Block copies checked and repaired by every scrub since start (for metrics: they only grow).</summary>
    public (long Checked, long Repaired) Totals => (Interlocked.Read(ref _checkedTotal), Interlocked.Read(ref _repairedTotal));

    public ScrubStatus Status
    {
        get
        {
            lock (_statusGate)
            {
                return _status;
            }
        }
    }

    public Task Start(CancellationToken stopping)
    {
        lock (_statusGate)
        {
            if (_running is { IsCompleted: false })
            {
                return _running;
            }
            _status = new ScrubStatus(true, 0, engine.ExtentCount, 0, 0, null);
            _running = Task.Run(() => ScrubAsync(stopping));
            return _running;
        }
    }

    /// <summary>Scrubs every <see cref="EngineOptions.ScrubInterval"/> (after the previous one ended) while all three replicas are in service.</summary>
    public async Task RunPeriodicallyAsync(CancellationToken cancellationToken)
    {
        try
        {
            while (true)
            {
                await Task.Delay(engine.Options.ScrubInterval, engine.Time, cancellationToken);
                // A replica out of service or under repair: wait for it rather than scrub two copies.
                while (await engine.InvokeAsync(() => engine.InServiceCount) < engine.Replicas.Length)
                {
                    await Task.Delay(TimeSpan.FromSeconds(1), engine.Time, cancellationToken);
                }
                await Start(cancellationToken);
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    private async Task ScrubAsync(CancellationToken cancellationToken)
    {
        long started = engine.Time.GetTimestamp();
        int chunkBlocks = Math.Max(1, Math.Min(engine.ExtentBlocks, engine.Options.RepairChunkBytes / engine.BlockSize));
        long checkedBlocks = 0;
        long repaired = 0;
        string? problem = null;
        try
        {
            for (int extent = 0; extent < engine.ExtentCount; extent++)
            {
                for (int first = 0; first < engine.ExtentBlocks; first += chunkBlocks)
                {
                    cancellationToken.ThrowIfCancellationRequested();
                    int count = Math.Min(chunkBlocks, engine.ExtentBlocks - first);
                    long chunkStarted = engine.Time.GetTimestamp();
                    (long c, long r) = await ScrubChunkAsync(extent, first, count);
                    checkedBlocks += c;
                    repaired += r;
                    Interlocked.Add(ref _checkedTotal, c);
                    Interlocked.Add(ref _repairedTotal, r);
                    await ReplicaMaintainer.PaceAsync(engine, chunkStarted, engine.Options.ScrubDutyCycle, cancellationToken);
                }
                lock (_statusGate)
                {
                    _status = _status with { ExtentsDone = extent + 1, BlocksChecked = checkedBlocks, BlocksRepaired = repaired };
                }
            }
        }
        catch (OperationCanceledException)
        {
            problem = "cancelled";
        }
        catch (Exception e) when (e is IOException or InvalidOperationException)
        {
            problem = e.Message;
        }
        lock (_statusGate)
        {
            _status = _status with { Running = false, BlocksChecked = checkedBlocks, BlocksRepaired = repaired, Problem = problem };
        }
        EngineLog.ScrubDone(engine.Logger, checkedBlocks, repaired, engine.Time.GetElapsedTime(started).TotalSeconds, problem ?? "complete");
    }

    /// <summary>Reads one chunk from every replica in service, repairs blocks that fail their own hash on one and pass on another.</summary>
    private async Task<(long Checked, long Repaired)> ScrubChunkAsync(int extent, int first, int count)
    {
        List<ReplicaConnection> sources = await engine.InvokeAsync(() =>
            engine.Replicas.Where(r => r.InService && r.Connection is not null).Select(r => r.Connection!).ToList());
        // A stalled replica's read is given up by the loop's deadline, not waited for.
        ValueTask<JobOutcome>[] reads = [.. sources.Select(s => engine.ReadExtentAsync(s, extent, first, count))];
        JobOutcome[] copies = new JobOutcome[reads.Length];
        for (int i = 0; i < reads.Length; i++)
        {
            copies[i] = await reads[i];
        }
        try
        {
            long repaired = 0;
            long firstBlock = ((long)extent * engine.ExtentBlocks) + first;
            for (int i = 0; i < copies.Length; i++)
            {
                if (!copies[i].Ok)
                {
                    continue;
                }
                for (int b = 0; b < count; b++)
                {
                    if (BlockIsGood(copies[i], b))
                    {
                        continue;
                    }
                    // Find a replica whose copy of this block passed, and rewrite from it.
                    int good = Enumerable.Range(0, copies.Length).FirstOrDefault(j => j != i && copies[j].Ok && BlockIsGood(copies[j], b), -1);
                    if (good < 0)
                    {
                        continue;
                    }
                    EngineLog.ReadRepaired(engine.Logger, firstBlock + b, 1, copies[i].Replica, "scrub: block does not match its stored hash", copies[good].Replica);
                    await volume.RepairBlocksAsync(copies[i].Replica, copies[good].Replica, firstBlock + b, 1);
                    repaired++;
                }
            }
            return ((long)count * copies.Count(c => c.Ok), repaired);
        }
        finally
        {
            foreach (JobOutcome copy in copies)
            {
                copy.ReturnBuffers();
            }
        }
    }

    private bool BlockIsGood(JobOutcome copy, int block)
    {
        ulong hash = BinaryPrimitives.ReadUInt64LittleEndian(copy.Hashes.AsSpan(block * BlockContext.Size));
        return BlockContext.Verify(copy.Data.AsSpan(block * engine.BlockSize, engine.BlockSize), hash);
    }
}

/// <summary>Progress of the last (or current) scrub.</summary>
public sealed record ScrubStatus(bool Running, int ExtentsDone, int ExtentTotal, long BlocksChecked, long BlocksRepaired, string? Problem);

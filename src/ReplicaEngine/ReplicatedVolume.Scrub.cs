using System.Buffers;
using System.Buffers.Binary;
using System.Diagnostics;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

// The scrub: every block of every replica in service, checked against its own stored hash.
public sealed partial class ReplicatedVolume
{
    private readonly Lock _scrubLock = new();
    private Task? _scrub;
    private ScrubStatus _scrubStatus = new(false, 0, 0, 0, 0, null);

    public ScrubStatus Scrub
    {
        get
        {
            lock (_scrubLock)
            {
                return _scrubStatus;
            }
        }
    }

    /// <summary>
    /// Starts a scrub unless one is running. A guest read checks only the one copy it reads, so rot in
    /// a copy nobody reads stays until a scrub: it reads each extent from every replica in service,
    /// checks each block against that replica's stored hash, and rewrites bad blocks from a good copy.
    /// Guest IO continues; the scrub reads one chunk at a time.
    /// </summary>
    public Task StartScrub()
    {
        lock (_gate)
        {
            if (_startup is not null)
            {
                return Task.CompletedTask; // not serving yet: nothing to scrub against
            }
        }
        lock (_scrubLock)
        {
            if (_scrub is { IsCompleted: false })
            {
                return _scrub;
            }
            _scrubStatus = new ScrubStatus(true, 0, _extentCount, 0, 0, null);
            _scrub = Task.Run(() => ScrubAsync(_stopping.Token));
            return _scrub;
        }
    }

    private async Task ScrubAsync(CancellationToken cancellationToken)
    {
        long started = Stopwatch.GetTimestamp();
        int chunkBlocks = Math.Max(1, Math.Min(_extentBlocks, _options.RepairChunkBytes / _blockSize));
        long checkedBlocks = 0;
        long repaired = 0;
        string? problem = null;
        try
        {
            for (int extent = 0; extent < _extentCount; extent++)
            {
                for (int first = 0; first < _extentBlocks; first += chunkBlocks)
                {
                    int count = Math.Min(chunkBlocks, _extentBlocks - first);
                    long chunkStarted = Stopwatch.GetTimestamp();
                    (long c, long r) = await ScrubChunkAsync(extent, first, count, cancellationToken);
                    checkedBlocks += c;
                    repaired += r;
                    await PaceAsync(chunkStarted, _options.ScrubDutyCycle, cancellationToken);
                }
                lock (_scrubLock)
                {
                    _scrubStatus = _scrubStatus with { ExtentsDone = extent + 1, BlocksChecked = checkedBlocks, BlocksRepaired = repaired };
                }
            }
        }
        catch (OperationCanceledException)
        {
            problem = "cancelled";
        }
        catch (Exception e) when (e is IOException or InvalidOperationException or DownstairsConnectionException)
        {
            problem = e.Message;
        }
        lock (_scrubLock)
        {
            _scrubStatus = _scrubStatus with { Running = false, BlocksChecked = checkedBlocks, BlocksRepaired = repaired, Problem = problem };
        }
        EngineLog.ScrubDone(_logger, checkedBlocks, repaired, Stopwatch.GetElapsedTime(started).TotalSeconds, problem ?? "complete");
    }

    /// <summary>Scrubs every <see cref="EngineOptions.ScrubInterval"/> (after the previous one ended) while all three replicas are in service.</summary>
    private async Task PeriodicScrubAsync(CancellationToken cancellationToken)
    {
        TimeSpan interval = _options.ScrubInterval;
        try
        {
            while (true)
            {
                await Task.Delay(interval, cancellationToken);
                // A replica out of service or under repair: wait for it rather than scrub two copies.
                while (InServiceCount() < _links.Length)
                {
                    await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
                }
                await StartScrub();
            }
        }
        catch (OperationCanceledException)
        {
        }
    }

    /// <summary>Reads one chunk from every replica in service, repairs blocks that fail their own hash on one and pass on another.</summary>
    private async Task<(long Checked, long Repaired)> ScrubChunkAsync(int extent, int first, int count, CancellationToken cancellationToken)
    {
        List<ReplicaLink> links;
        lock (_gate)
        {
            links = [.. _links.Where(l => l.State == ReplicaState.Active && l.Client is not null)];
        }
        var copies = new List<(ReplicaLink Link, byte[] Contexts, byte[] Data, bool Ok)>();
        try
        {
            foreach (ReplicaLink link in links)
            {
                copies.Add((link, ArrayPool<byte>.Shared.Rent(count * BlockContext.Size), ArrayPool<byte>.Shared.Rent(count * _blockSize), false));
            }
            Task<bool>[] reads = [.. copies.Select(c => ReadExtentForScrubAsync(c.Link, extent, first, count, c.Contexts, c.Data, cancellationToken))];
            bool[] ok = await Task.WhenAll(reads);
            long repaired = 0;
            long firstBlock = (long)extent * _extentBlocks + first;
            for (int i = 0; i < copies.Count; i++)
            {
                if (!ok[i])
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
                    int good = Enumerable.Range(0, copies.Count).FirstOrDefault(j => j != i && ok[j] && BlockIsGood(copies[j], b), -1);
                    if (good < 0)
                    {
                        continue;
                    }
                    EngineLog.ReadRepaired(_logger, firstBlock + b, 1, copies[i].Link.Index, "scrub: block does not match its stored hash", copies[good].Link.Index);
                    await RepairBlocksAsync(copies[i].Link, copies[good].Link, firstBlock + b, 1, cancellationToken);
                    repaired++;
                }
            }
            return ((long)count * ok.Count(x => x), repaired);
        }
        finally
        {
            foreach (var c in copies)
            {
                ArrayPool<byte>.Shared.Return(c.Contexts);
                ArrayPool<byte>.Shared.Return(c.Data);
            }
        }
    }

    private bool BlockIsGood((ReplicaLink Link, byte[] Contexts, byte[] Data, bool Ok) copy, int block)
    {
        ulong hash = BinaryPrimitives.ReadUInt64LittleEndian(copy.Contexts.AsSpan(block * BlockContext.Size));
        return BlockContext.Verify(copy.Data.AsSpan(block * _blockSize, _blockSize), hash);
    }

    /// <summary>One extent read for the scrub, bounded in time: a stalled replica is skipped, not waited for.</summary>
    private async Task<bool> ReadExtentForScrubAsync(ReplicaLink link, int extent, int first, int count, byte[] contexts, byte[] data, CancellationToken cancellationToken)
    {
        IDownstairs? client;
        lock (_gate)
        {
            client = link.Client;
        }
        if (client is null)
        {
            return false;
        }
        // Our own buffers are returned when the chunk is done: a read that outlives the timeout would
        // write into them later, so it gets private copies instead.
        byte[] ctx = ArrayPool<byte>.Shared.Rent(count * BlockContext.Size);
        byte[] blocks = ArrayPool<byte>.Shared.Rent(count * _blockSize);
        Task<ExtentReadResult> read;
        try
        {
            read = client.ReadExtentAsync(NextJobId(), new ExtentRange(extent, first, count), ctx.AsMemory(0, count * BlockContext.Size), blocks.AsMemory(0, count * _blockSize), cancellationToken);
        }
        catch (Exception e) when (e is DownstairsConnectionException or ObjectDisposedException)
        {
            ArrayPool<byte>.Shared.Return(ctx);
            ArrayPool<byte>.Shared.Return(blocks);
            return false;
        }
        Task settled = read.ContinueWith(_ => { }, TaskScheduler.Default);
        if (await Task.WhenAny(settled, Task.Delay(_options.ReadAttemptTimeout * 5, cancellationToken)) != settled)
        {
            _ = settled.ContinueWith(_ => { ArrayPool<byte>.Shared.Return(ctx); ArrayPool<byte>.Shared.Return(blocks); }, TaskScheduler.Default);
            return false;
        }
        try
        {
            if (!read.IsCompletedSuccessfully || !read.Result.Result.IsOk)
            {
                return false;
            }
            ctx.AsSpan(0, count * BlockContext.Size).CopyTo(contexts);
            blocks.AsSpan(0, count * _blockSize).CopyTo(data);
            return true;
        }
        finally
        {
            ArrayPool<byte>.Shared.Return(ctx);
            ArrayPool<byte>.Shared.Return(blocks);
        }
    }
}

/// <summary>Progress of the last (or current) scrub.</summary>
public sealed record ScrubStatus(bool Running, int ExtentsDone, int ExtentTotal, long BlocksChecked, long BlocksRepaired, string? Problem);

using System.Diagnostics;
using System.Globalization;
using System.Net;
using System.Text;
using NbdServer.Common.Text;
using NbdServer.Common.Tls;
using NbdServer.Protocol;
using NbdServer.Downstairs.Server;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Cli;

internal static class Commands
{
    /// <summary>How often `create` reports progress on stderr (only when it takes that long).</summary>
    private static readonly TimeSpan CreateProgressInterval = TimeSpan.FromSeconds(2);

    public static int Create(CommandArgs a)
    {
        string dir = a.Required("--data");
        long size = ByteSize.Parse(a.Required("--size"), "--size");
        int blockSize = a.Int("--block-size", 4096);
        int? extent = a.String("--extent-size") is null ? null : a.Int("--extent-size", 0);
        bool prealloc = a.Flag("--preallocate");
        var clock = Stopwatch.StartNew();
        TimeSpan nextReport = CreateProgressInterval;
        using Region region = Region.Create(dir, size, blockSize, extent, prealloc, (done, total) =>
        {
            if (clock.Elapsed >= nextReport && done < total)
            {
                nextReport = clock.Elapsed + CreateProgressInterval;
                Console.Error.WriteLine(string.Create(CultureInfo.InvariantCulture,
                    $"nbd-downstairs create: {done}/{total} extent files {(prealloc ? "preallocated" : "created")} ({100.0 * done / total:0}%, {clock.Elapsed.TotalSeconds:0} s)"));
            }
        });
        Console.WriteLine($"created region {region.Uuid} in {Path.GetFullPath(dir)}: {ByteSize.Format(region.Geometry.SizeBytes)} " +
            $"({region.Geometry.BlockCount} blocks of {region.Geometry.BlockSize}), {region.Geometry.ExtentCount} extents of {region.Geometry.ExtentBlocks} blocks, {(prealloc ? "preallocated" : "sparse")}");
        return 0;
    }

    public static int Info(CommandArgs a)
    {
        string dir = a.Required("--data");
        using Region region = Region.Open(dir, readOnly: true);
        RegionGeometry g = region.Geometry;
        var sb = new StringBuilder();
        sb.AppendLine(CultureInfo.InvariantCulture, $"region:        {region.Uuid}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"directory:     {Path.GetFullPath(dir)}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"format:        version {RegionLayout.FormatVersion}, {(region.Preallocated ? "preallocated" : "sparse")}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"size:          {g.SizeBytes} bytes ({ByteSize.Format(g.SizeBytes)})");
        sb.AppendLine(CultureInfo.InvariantCulture, $"block size:    {g.BlockSize}");
        sb.AppendLine(CultureInfo.InvariantCulture, $"extents:       {g.ExtentCount} × {g.ExtentBlocks} blocks");
        sb.AppendLine(CultureInfo.InvariantCulture, $"generation:    {region.HighestGeneration} (highest seen)");
        sb.AppendLine("extent  generation  flush  dirty  uncertain");
        ExtentMeta[] all = region.GetAllExtentMeta();
        for (int i = 0; i < all.Length; i++)
        {
            sb.AppendLine(CultureInfo.InvariantCulture, $"{i,6}  {all[i].Generation,10}  {all[i].FlushNumber,5}  {(all[i].Dirty ? "yes" : "no"),5}  {(all[i].Uncertain ? "yes" : "no")}");
        }
        Console.Write(sb.ToString());
        return 0;
    }

    public static DownstairsOptions RunOptions(CommandArgs a)
    {
        var d = new DownstairsOptions { DataDir = "" };
        var options = new DownstairsOptions
        {
            DataDir = a.Required("--data"),
            Listen = a.String("--listen") is { } l ? CommandArgs.Endpoint("--listen", l) : d.Listen,
            IoThreads = a.Int("--io-threads", d.IoThreads),
            MaxJobsPerConnection = a.Int("--max-jobs", d.MaxJobsPerConnection),
            MaxBytesPerConnection = a.Size("--max-bytes", d.MaxBytesPerConnection),
            MaxFrameBytes = checked((int)a.Size("--max-frame", d.MaxFrameBytes)),
            MaxConnections = a.Int("--max-connections", d.MaxConnections),
            HelloTimeout = a.Seconds("--hello-timeout", d.HelloTimeout),
            IdleTimeout = a.Seconds("--idle-timeout", d.IdleTimeout),
            FrameTimeout = a.Seconds("--frame-timeout", d.FrameTimeout),
            SendTimeout = a.Seconds("--send-timeout", d.SendTimeout),
            MaxMemoryBytes = a.Size("--max-memory", d.MaxMemoryBytes),
            MaxGenerationStep = a.ULong("--max-generation-step", d.MaxGenerationStep),
            MaxFlushStep = a.ULong("--max-flush-step", d.MaxFlushStep),
            LogSummaryInterval = a.Seconds("--log-interval", d.LogSummaryInterval),
            ReceiveBufferBytes = checked((int)a.Size("--receive-buffer", d.ReceiveBufferBytes)),
            StickyDirty = a.Flag("--sticky-dirty"),
            TlsDir = a.String("--tls-dir"),
            TlsAllowClients = a.String("--tls-allow-client") is { } allow
                ? allow.Trim() == "*" ? [] : [.. allow.Split(',', StringSplitOptions.TrimEntries | StringSplitOptions.RemoveEmptyEntries)]
                : d.TlsAllowClients,
            TlsHandshakeTimeout = a.Seconds("--tls-handshake-timeout", d.TlsHandshakeTimeout),
            Insecure = a.Flag("--insecure"),
        };
        options.Validate();
        return options;
    }

    private static IEnumerable<long> LongRange(long count)
    {
        for (long i = 0; i < count; i++)
        {
            yield return i;
        }
    }

    /// <summary>Load generator for the benchmark script: fixed queue depth, optional flush every N writes.</summary>
    public static async Task<int> BenchAsync(CommandArgs a)
    {
        IPEndPoint target = CommandArgs.Endpoint("--target", a.Required("--target"));
        string pattern = a.Required("--pattern");
        long ioSize = a.Size("--io-size", 4096);
        int depth = a.Int("--depth", 32);
        TimeSpan duration = a.Seconds("--seconds", TimeSpan.FromSeconds(10));
        int flushEvery = a.Int("--flush-every", 64);
        long span = a.Size("--span", 0);
        bool fill = a.Flag("--fill");
        string? tlsDir = a.String("--tls-dir");
        if (pattern is not ("randwrite" or "seqwrite" or "randread"))
        {
            throw new ArgumentException("--pattern must be randwrite, seqwrite or randread");
        }
        using TlsCredentials? credentials = tlsDir is null ? null : TlsCredentials.LoadClient(tlsDir);
        var clientOptions = new DownstairsClientOptions { Tls = credentials is null ? null : new TlsClientPolicy(credentials) { CoalesceWrites = true } };
        // Take over as the next generation, as an upstairs does: probe read-only for the highest one
        // seen (a jump such as the Unix time would be refused by --max-generation-step).
        ulong highest;
        await using (DownstairsClient probe = await DownstairsClient.ConnectAsync(target,
            new HelloRequest(Wire.ProtocolVersion, true, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 0), clientOptions).ConfigureAwait(false))
        {
            highest = probe.Region.HighestGeneration;
        }
        await using DownstairsClient client = await DownstairsClient.ConnectAsync(target,
            new HelloRequest(Wire.ProtocolVersion, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), checked(highest + 1)), clientOptions).ConfigureAwait(false);
        int bs = client.BlockSize;
        long regionBytes = client.Region.RegionBytes;
        span = span <= 0 || span > regionBytes ? regionBytes : span;
        int blocksPerIo = checked((int)(ioSize / bs));
        long slots = span / ioSize;
        bool write = pattern != "randread";
        byte[][] buffers = new byte[depth][];
        byte[][] hashes = new byte[depth][];
        for (int i = 0; i < depth; i++)
        {
            buffers[i] = new byte[ioSize];
            Random.Shared.NextBytes(buffers[i]);
            hashes[i] = new byte[blocksPerIo * Wire.HashSize];
            BlockContext.HashBlocks(buffers[i], bs, hashes[i]);
        }
        long jobId = 0, ops = 0, next = 0, errors = 0, flushes = 0;
        ulong generation = client.Region.HighestGeneration;
        if (fill)
        {
            // Like fio's file layout before a run: every block written once, so the measured writes
            // are overwrites of allocated blocks for both, not first-touch allocations for one.
            byte[] chunk = new byte[1 << 20];
            byte[] chunkHashes = new byte[chunk.Length / bs * Wire.HashSize];
            BlockContext.HashBlocks(chunk, bs, chunkHashes);
            long chunks = regionBytes / chunk.Length;
            await Parallel.ForEachAsync(LongRange(chunks), new ParallelOptions { MaxDegreeOfParallelism = 16 }, async (i, _) =>
            {
                DownstairsResult r = await client.WriteAsync((ulong)Interlocked.Increment(ref jobId), i * (chunk.Length / bs), chunk, chunkHashes).ConfigureAwait(false);
                if (!r.IsOk)
                {
                    throw new IOException($"fill failed: {r}");
                }
            }).ConfigureAwait(false);
            DownstairsResult f = await client.FlushAsync((ulong)Interlocked.Increment(ref jobId), 1, generation).ConfigureAwait(false);
            if (!f.IsOk)
            {
                throw new IOException($"fill flush failed: {f}");
            }
        }
        var stopwatch = Stopwatch.StartNew();
        var gate = new SemaphoreSlim(1, 1);
        async Task Worker(int w)
        {
            while (stopwatch.Elapsed < duration)
            {
                long slot = pattern == "seqwrite" ? Interlocked.Increment(ref next) % slots : Random.Shared.NextInt64(slots);
                ulong id = (ulong)Interlocked.Increment(ref jobId);
                DownstairsResult r = write
                    ? await client.WriteAsync(id, slot * blocksPerIo, buffers[w], hashes[w]).ConfigureAwait(false)
                    : await client.ReadAsync(id, slot * blocksPerIo, buffers[w]).ConfigureAwait(false);
                if (!r.IsOk)
                {
                    Interlocked.Increment(ref errors);
                }
                long done = Interlocked.Increment(ref ops);
                if (write && flushEvery > 0 && done % flushEvery == 0)
                {
                    // Like fio's fsync=N: the flush covers the writes before it; workers carry on.
                    DownstairsResult f = await client.FlushAsync((ulong)Interlocked.Increment(ref jobId), (ulong)Interlocked.Increment(ref flushes), generation).ConfigureAwait(false);
                    if (!f.IsOk)
                    {
                        Interlocked.Increment(ref errors);
                    }
                }
            }
        }
        await Task.WhenAll(Enumerable.Range(0, depth).Select(Worker)).ConfigureAwait(false);
        gate.Dispose();
        double seconds = stopwatch.Elapsed.TotalSeconds;
        Console.WriteLine(string.Create(CultureInfo.InvariantCulture,
            $"pattern={pattern} io={ioSize} depth={depth} ops={ops} flushes={flushes} errors={errors} seconds={seconds:0.00} iops={ops / seconds:0} mibps={ops * ioSize / seconds / (1 << 20):0.0}"));
        return errors == 0 ? 0 : 1;
    }
}

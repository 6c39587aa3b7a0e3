using System.Diagnostics;
using System.Globalization;
using System.Net.Sockets;
using NbdServer.Nbd;

namespace NbdServer.Tools.Verify;

/// <summary><c>nbd-verify</c> once parsed: see <see cref="VerifyCommandLine"/>.</summary>
internal static class VerifyCommand
{
    private const int ExitOk = 0;
    private const int ExitWrong = 1;
    private const int ExitUsage = 2;
    private const int ExitLost = 3;
    private const int MaxReported = 20;
    private const int VerifyChunkBlocks = 64;

    public static async Task<int> RunAsync(VerifyOptions o)
    {
        // SIGINT / SIGTERM end the load phase early; the final flush and the read-back still run.
        using var cancel = new CancellationTokenSource();
        Console.CancelKeyPress += (_, e) => { e.Cancel = true; cancel.Cancel(); };
        using var term = System.Runtime.InteropServices.PosixSignalRegistration.Create(
            System.Runtime.InteropServices.PosixSignal.SIGTERM, ctx => { ctx.Cancel = true; cancel.Cancel(); });

        NbdClient client;
        try
        {
            client = await ConnectWithRetryAsync(o.Uri!, CancellationToken.None);
        }
        catch (Exception e) when (e is IOException or SocketException or ArgumentException or OperationCanceledException)
        {
            Console.Error.WriteLine($"nbd-verify: cannot connect to {o.Uri}: {e.Message}");
            return ExitLost;
        }
        await using (client)
        {
            WriteLog log;
            try
            {
                log = OpenLog(o, client);
            }
            catch (Exception e) when (e is ArgumentException or InvalidDataException or IOException)
            {
                Console.Error.WriteLine($"nbd-verify: {e.Message}");
                return ExitUsage;
            }
            var run = new Run(o, client, log);
            return await run.ExecuteAsync(cancel.Token);
        }
    }

    private static async Task<NbdClient> ConnectWithRetryAsync(Uri uri, CancellationToken cancel)
    {
        // A server started just before us may not listen yet: a few tries over at most ~10 s.
        for (int attempt = 1; ; attempt++)
        {
            try
            {
                return await NbdClient.ConnectAsync(uri, cancel);
            }
            catch (SocketException) when (attempt < 40)
            {
                await Task.Delay(250, cancel);
            }
        }
    }

    private static WriteLog OpenLog(VerifyOptions o, NbdClient client)
    {
        if (o.LogPath is { } path && File.Exists(path))
        {
            WriteLog loaded = WriteLog.Load(path);
            if ((ulong)loaded.OffsetBytes + (ulong)(loaded.Blocks * loaded.BlockSize) > client.Size)
            {
                throw new ArgumentException($"the log in {path} covers more than the device's {client.Size} bytes");
            }
            return loaded;
        }
        if (o.CheckOnly)
        {
            throw new ArgumentException($"no write log at {o.LogPath}");
        }
        long device = (long)client.Size;
        if (o.Offset < 0 || o.Offset >= device || o.Offset % o.BlockSize != 0)
        {
            throw new ArgumentException($"--offset {o.Offset} is outside the device ({device} bytes) or not block aligned");
        }
        long range = Math.Min(o.Range ?? device - o.Offset, device - o.Offset);
        long blocks = range / o.BlockSize;
        if (blocks < 1)
        {
            throw new ArgumentException("the range holds no whole block");
        }
        ulong tag = (ulong)new Random(o.Seed ?? Environment.TickCount).NextInt64() | 1;
        return new WriteLog(o.BlockSize, blocks, tag, (ulong)o.Offset);
    }

    /// <summary>One verifier run: the load phase, the final flush and the read-back.</summary>
    private sealed class Run(VerifyOptions o, NbdClient client, WriteLog log)
    {
        private readonly int[] _busy = new int[log.Blocks];
        private readonly IoStats _stats = new(o.QueueDepth + 1);
        private readonly Lock _outLock = new();
        private long _ackedSinceFlush;
        private volatile bool _lost;
        private string? _lostReason;
        private long _readMismatches;
        private int _reported;

        public async Task<int> ExecuteAsync(CancellationToken cancel)
        {
            Say($"verify: device {client.Size} bytes, range {log.Blocks} blocks of {log.BlockSize} at offset {log.OffsetBytes}, tag {log.Tag:x16}" +
                (o.CheckOnly ? ", check only" : $", qd {o.QueueDepth}, {o.DurationSeconds}s, flush every {o.FlushEvery} writes"), toStderr: true);
            bool flushedAtEnd = true;
            if (!o.CheckOnly && o.DurationSeconds > 0)
            {
                await LoadAsync(cancel);
                if (!_lost)
                {
                    flushedAtEnd = await FinalFlushAsync();
                }
            }
            if (_lost)
            {
                // The server may have crashed: only flushed writes are promised from here on.
                log.ForgetUnflushed();
            }
            SaveLog();
            VerifyResult result = default;
            if (!o.NoVerify && !_lost)
            {
                result = await VerifyAllAsync(CancellationToken.None);
            }
            if (_lost)
            {
                Say($"verify: connection lost ({_lostReason}); log {(o.LogPath is null ? "not saved (no --log)" : $"saved to {o.LogPath}")}", toStderr: true);
            }
            PrintSummary(result, flushedAtEnd);
            if (_lost)
            {
                return ExitLost;
            }
            return result.Wrong > 0 || _readMismatches > 0 ? ExitWrong : ExitOk;
        }

        private void SaveLog()
        {
            if (o.LogPath is { } path)
            {
                try
                {
                    log.Save(path);
                }
                catch (IOException e)
                {
                    Say($"verify: cannot save the log to {path}: {e.Message}", toStderr: true);
                }
            }
        }

        private async Task LoadAsync(CancellationToken cancel)
        {
            using var stop = CancellationTokenSource.CreateLinkedTokenSource(cancel);
            stop.CancelAfter(TimeSpan.FromSeconds(o.DurationSeconds));
            var seed = new Random(o.Seed ?? Environment.TickCount);
            var workers = new Task[o.QueueDepth];
            for (int i = 0; i < workers.Length; i++)
            {
                int slot = i;
                int workerSeed = seed.Next();
                workers[i] = Task.Run(() => WorkerAsync(slot, new Random(workerSeed), stop.Token), CancellationToken.None);
            }
            Task all = Task.WhenAll(workers);
            using var timer = new PeriodicTimer(TimeSpan.FromSeconds(1));
            var drainDeadline = TimeSpan.FromSeconds(o.DurationSeconds + o.DrainTimeoutSeconds);
            var sw = Stopwatch.StartNew();
            // Bounded: ends when the workers end, or at duration + drain timeout.
            while (!all.IsCompleted && sw.Elapsed < drainDeadline)
            {
                Task tick = timer.WaitForNextTickAsync(CancellationToken.None).AsTask();
                if (await Task.WhenAny(tick, all) == tick)
                {
                    // Seconds after the load stopped (draining) don't count toward the minimum.
                    string line = _stats.Tick(o.Json, countInMinimum: !stop.IsCancellationRequested);
                    if (!o.Quiet)
                    {
                        Say(line);
                    }
                }
            }
            if (!all.IsCompleted)
            {
                _lostReason = $"requests still outstanding {o.DrainTimeoutSeconds}s after the load ended";
                _lost = true;
            }
        }

        private async Task WorkerAsync(int slot, Random rng, CancellationToken stop)
        {
            byte[] buffer = new byte[log.BlockSize];
            while (!stop.IsCancellationRequested && !_lost)
            {
                if (o.FlushEvery > 0 && Interlocked.Read(ref _ackedSinceFlush) >= o.FlushEvery)
                {
                    if (Interlocked.Exchange(ref _ackedSinceFlush, 0) >= o.FlushEvery)
                    {
                        await FlushAsync(slot);
                        continue;
                    }
                }
                long block = PickFreeBlock(rng);
                if (block < 0)
                {
                    await Task.Yield();
                    continue;
                }
                try
                {
                    if (rng.Next(100) < o.ReadPercent)
                    {
                        await ReadOneAsync(slot, block, buffer);
                    }
                    else
                    {
                        await WriteOneAsync(slot, block, buffer);
                    }
                }
                finally
                {
                    Volatile.Write(ref _busy[block], 0);
                }
            }
        }

        private long PickFreeBlock(Random rng)
        {
            for (int tries = 0; tries < 16; tries++)
            {
                long b = rng.NextInt64(log.Blocks);
                if (Interlocked.CompareExchange(ref _busy[b], 1, 0) == 0)
                {
                    return b;
                }
            }
            return -1;
        }

        private ulong ByteOffset(long block) => log.OffsetBytes + (ulong)(block * log.BlockSize);

        private async Task WriteOneAsync(int slot, long block, byte[] buffer)
        {
            uint counter = log.BeginWrite(block);
            BlockPattern.Fill(buffer, log.Tag, (ulong)block, counter);
            _stats.Started(slot);
            NbdError error;
            try
            {
                error = await client.WriteAsync(ByteOffset(block), buffer);
            }
            catch (NbdConnectionLostException e)
            {
                log.WriteUnknown(block);
                Lost(e.Message);
                return;
            }
            _stats.Completed(slot, 'w', error != NbdError.None);
            if (error == NbdError.None)
            {
                log.WriteAcked(block, counter);
                Interlocked.Increment(ref _ackedSinceFlush);
            }
            else
            {
                log.WriteUnknown(block);
            }
        }

        private async Task ReadOneAsync(int slot, long block, byte[] buffer)
        {
            _stats.Started(slot);
            NbdError error;
            try
            {
                error = await client.ReadAsync(ByteOffset(block), buffer);
            }
            catch (NbdConnectionLostException e)
            {
                Lost(e.Message);
                return;
            }
            _stats.Completed(slot, 'r', error != NbdError.None);
            if (error == NbdError.None && Check(block, buffer, online: true) is { } problem)
            {
                Interlocked.Increment(ref _readMismatches);
                Report($"verify: READ MISMATCH block {block} (byte {ByteOffset(block)}): {problem}");
            }
        }

        private async Task FlushAsync(int slot)
        {
            long seq = log.BeginFlush();
            _stats.Started(slot);
            NbdError error;
            try
            {
                error = await client.FlushAsync();
            }
            catch (NbdConnectionLostException e)
            {
                Lost(e.Message);
                return;
            }
            _stats.Completed(slot, 'f', error != NbdError.None);
            if (error == NbdError.None)
            {
                log.FlushCompleted(seq);
            }
        }

        private async Task<bool> FinalFlushAsync()
        {
            long seq = log.BeginFlush();
            try
            {
                NbdError error = await client.FlushAsync().WaitAsync(TimeSpan.FromSeconds(Math.Max(1, o.DrainTimeoutSeconds)));
                if (error == NbdError.None)
                {
                    log.FlushCompleted(seq);
                    return true;
                }
                Say($"verify: final FLUSH failed: {error}", toStderr: true);
            }
            catch (NbdConnectionLostException e)
            {
                Lost(e.Message);
            }
            catch (TimeoutException)
            {
                Say("verify: final FLUSH timed out", toStderr: true);
            }
            return false;
        }

        private void Lost(string reason)
        {
            _lostReason ??= reason;
            _lost = true;
        }

        private record struct VerifyResult(long Checked, long Wrong, long Stale, long LostUnflushed, long Phantom, long Garbage, long Unreadable, double Seconds);

        /// <summary>Reads the whole range back (QD chunks in flight) and checks every block against the log.</summary>
        private async Task<VerifyResult> VerifyAllAsync(CancellationToken cancel)
        {
            var sw = Stopwatch.StartNew();
            long chunks = (log.Blocks + VerifyChunkBlocks - 1) / VerifyChunkBlocks;
            long next = -1;
            long checkedBlocks = 0, wrong = 0, stale = 0, lostUnflushed = 0, phantom = 0, garbage = 0, unreadable = 0;
            async Task Worker()
            {
                byte[] buffer = new byte[VerifyChunkBlocks * log.BlockSize];
                long chunk;
                while ((chunk = Interlocked.Increment(ref next)) < chunks && !cancel.IsCancellationRequested && !_lost)
                {
                    long first = chunk * VerifyChunkBlocks;
                    int count = (int)Math.Min(VerifyChunkBlocks, log.Blocks - first);
                    Memory<byte> into = buffer.AsMemory(0, count * log.BlockSize);
                    NbdError error;
                    try
                    {
                        error = await client.ReadAsync(ByteOffset(first), into);
                    }
                    catch (NbdConnectionLostException e)
                    {
                        Lost(e.Message);
                        return;
                    }
                    if (error != NbdError.None)
                    {
                        Interlocked.Add(ref unreadable, count);
                        Interlocked.Add(ref wrong, count);
                        Interlocked.Add(ref checkedBlocks, count);
                        Report($"verify: READ ERROR {error} for blocks {first}..{first + count - 1}");
                        continue;
                    }
                    for (int i = 0; i < count; i++)
                    {
                        long block = first + i;
                        Interlocked.Increment(ref checkedBlocks);
                        ReadOnlySpan<byte> data = buffer.AsSpan(i * log.BlockSize, log.BlockSize);
                        if (Check(block, data, online: !o.CheckOnly) is not { } problem)
                        {
                            continue;
                        }
                        Interlocked.Increment(ref wrong);
                        if (problem.StartsWith("stale-flushed", StringComparison.Ordinal))
                        {
                            Interlocked.Increment(ref stale);
                        }
                        else if (problem.StartsWith("stale-acked", StringComparison.Ordinal))
                        {
                            Interlocked.Increment(ref lostUnflushed);
                        }
                        else if (problem.StartsWith("phantom", StringComparison.Ordinal))
                        {
                            Interlocked.Increment(ref phantom);
                        }
                        else
                        {
                            Interlocked.Increment(ref garbage);
                        }
                        Report($"verify: WRONG block {block} (byte {ByteOffset(block)}): {problem}");
                    }
                }
            }
            await Task.WhenAll(Enumerable.Range(0, Math.Max(1, o.QueueDepth)).Select(_ => Task.Run(Worker, CancellationToken.None)));
            if (_lost)
            {
                Say($"verify: connection lost during the read-back ({_lostReason})", toStderr: true);
            }
            return new VerifyResult(checkedBlocks, wrong, stale, lostUnflushed, phantom, garbage, unreadable, sw.Elapsed.TotalSeconds);
        }

        /// <summary>Null when the block's content is acceptable; else why not.</summary>
        private string? Check(long block, ReadOnlySpan<byte> data, bool online)
        {
            BlockKind kind = BlockPattern.Classify(data, log.Tag, (ulong)block, out ulong counter);
            uint acked = log.Acked(block), issued = log.Issued(block), flushed = log.Flushed(block);
            bool uncertain = log.Uncertain(block);
            // Online and certain: exactly the last acknowledged write. Otherwise anything from the last
            // flushed write up to the last one sent.
            ulong lowest = online && !uncertain ? acked : flushed;
            switch (kind)
            {
                case BlockKind.Zero when lowest == 0:
                    return null;
                case BlockKind.Zero:
                    return Describe(acked >= lowest && flushed < lowest ? "stale-acked" : "stale-flushed", "zeroes");
                case BlockKind.Garbage:
                    return Describe("garbage", "data never written by this log (torn, rotted, misplaced or foreign)");
                case BlockKind.Valid when counter > issued:
                    return Describe("phantom", $"write #{counter}, never sent");
                case BlockKind.Valid when counter < flushed:
                    return Describe("stale-flushed", $"write #{counter}, older than the last flushed write");
                case BlockKind.Valid when counter < lowest:
                    return Describe("stale-acked", $"write #{counter}, older than the last acknowledged write");
                default:
                    return null;
            }

            string Describe(string what, string found) =>
                $"{what}: holds {found}; log: acked #{acked}, flushed #{flushed}, issued #{issued}{(uncertain ? ", last outcome unknown" : "")}";
        }

        private void Report(string line)
        {
            if (Interlocked.Increment(ref _reported) <= MaxReported)
            {
                Say(line, toStderr: true);
            }
            else if (_reported == MaxReported + 1)
            {
                Say("verify: (further problems are counted, not listed)", toStderr: true);
            }
        }

        private void PrintSummary(VerifyResult r, bool flushedAtEnd)
        {
            var c = CultureInfo.InvariantCulture;
            long minIos = _stats.MinIosPerSecond == long.MaxValue ? 0 : _stats.MinIosPerSecond;
            string fields = string.Create(c,
                $"blocks_checked={r.Checked} blocks_wrong={r.Wrong} stale_flushed={r.Stale} stale_acked={r.LostUnflushed} phantom={r.Phantom} garbage={r.Garbage} unreadable={r.Unreadable} " +
                $"read_mismatches={_readMismatches} ios={_stats.TotalIos} io_errors={_stats.TotalErrors} seconds={_stats.Seconds} min_ios_per_s={minIos} " +
                $"max_lat_ms={IoStats.Ms(_stats.MaxLatencyTicksEver):F1} verify_s={r.Seconds:F2} final_flush={(flushedAtEnd ? "ok" : "failed")} connection={(_lost ? "lost" : "ok")}");
            if (o.Json)
            {
                string json = "{\"summary\":true," + string.Join(",", fields.Split(' ').Select(kv =>
                {
                    string[] p = kv.Split('=', 2);
                    bool number = double.TryParse(p[1], NumberStyles.Float, c, out _);
                    return $"\"{p[0]}\":{(number ? p[1] : $"\"{p[1]}\"")}";
                })) + "}";
                Say(json);
            }
            else
            {
                Say("verify: summary " + fields);
            }
        }

        private void Say(string line, bool toStderr = false)
        {
            lock (_outLock)
            {
                (toStderr ? Console.Error : Console.Out).WriteLine(line);
            }
        }
    }
}

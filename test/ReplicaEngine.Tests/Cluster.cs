using System.Collections.Concurrent;
using System.Diagnostics;
using System.Net;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>Three fake replicas and (once started) the engine over them, plus the helpers every test uses.</summary>
internal sealed class Cluster : IAsyncDisposable
{
    public const int BlockSize = 512;
    public const int ExtentBlocks = 8;
    public const int ExtentCount = 16;
    public const int ExtentBytes = BlockSize * ExtentBlocks;

    /// <summary>Upper bound of every wait in these tests: generous, so a slow machine never flakes.</summary>
    public static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    private ReplicatedVolume? _volume;

    public Cluster()
    {
        Replicas = [.. Enumerable.Range(0, 3).Select(i => new FakeReplica(i, BlockSize, ExtentBlocks, ExtentCount))];
        Connector = new FakeConnector(Replicas);
    }

    public FakeReplica[] Replicas { get; }

    public FakeConnector Connector { get; }

    public ListLogger Log { get; } = new();

    public ReplicatedVolume Volume => _volume ?? throw new InvalidOperationException("not started");

    /// <summary>Options for tests: fast reconnects and startup; faults only where a test asks for them.</summary>
    public static EngineOptions Options() => new()
    {
        Downstairs = [new IPEndPoint(IPAddress.Loopback, 40001), new IPEndPoint(IPAddress.Loopback, 40002), new IPEndPoint(IPAddress.Loopback, 40003)],
        NoProgressTimeout = TimeSpan.FromSeconds(5),
        DegradedWriteTimeout = TimeSpan.FromSeconds(1),
        StartupWaitForAll = TimeSpan.FromSeconds(5),
        StartupTimeout = TimeSpan.FromSeconds(10),
        ReconnectInitialDelay = TimeSpan.FromMilliseconds(20),
        ReconnectMaxDelay = TimeSpan.FromMilliseconds(100),
    };

    /// <param name="time">The engine's clock: a FakeTimeProvider makes every deadline a test's to pass.</param>
    public async Task<ReplicatedVolume> StartAsync(EngineOptions? options = null, TimeProvider? time = null)
    {
        using var cts = new CancellationTokenSource(Patience);
        _volume = await ReplicatedVolume.StartAsync(options ?? Options(), Log, Connector, cts.Token, time: time);
        return _volume;
    }

    /// <summary>
    /// Starts the engine on a fake clock that moves only once every reachable replica has answered its
    /// startup probe: then time passes just for what waits on it (<see cref="EngineOptions.StartupWaitForAll"/>
    /// for a replica that never answers sensibly, probe retries), never for a probe merely slow in real time.
    /// </summary>
    public async Task<ReplicatedVolume> StartAdvancingAsync(FakeTimeProvider clock, EngineOptions? options = null, TimeSpan? step = null)
    {
        using var cts = new CancellationTokenSource(Patience);
        ReplicatedVolume? early = null;
        Task<ReplicatedVolume> starting = ReplicatedVolume.StartAsync(options ?? Options(), Log, Connector, cts.Token, created: v => early = v, time: clock);
        var real = Stopwatch.StartNew();
        while (!starting.IsCompleted)
        {
            bool probed = Replicas.All(r => !r.Reachable || r.Hellos.Any(h => h.ReadOnly));
            if (probed && early?.GetStatus().Startup is { Phase: "probing" })
            {
                clock.Advance(step ?? Engine.TickInterval);
            }
            if (real.Elapsed > Patience)
            {
                Assert.Fail($"the volume did not start within {Patience.TotalSeconds:0} s");
            }
            await Task.WhenAny(starting, Task.Delay(5));
        }
        _volume = await starting;
        return _volume;
    }

    public ReplicaStatus Status(int replica) => Volume.GetStatus().Replicas[replica];

    // ------------------------------------------------------------ data helpers

    /// <summary>Blocks of recognisable content: every byte depends on the seed, the block and the offset.</summary>
    public static byte[] Pattern(int seed, long firstBlock, int blocks = 1)
    {
        byte[] data = new byte[blocks * BlockSize];
        for (int i = 0; i < data.Length; i++)
        {
            data[i] = (byte)((seed * 31) + ((firstBlock + (i / BlockSize)) * 7) + (i % BlockSize % 251));
        }
        return data;
    }

    public async Task WriteAsync(long firstBlock, int seed, int blocks = 1, WriteOptions options = WriteOptions.None)
    {
        using var cts = new CancellationTokenSource(Patience);
        Task write = Volume.WriteAsync(firstBlock * BlockSize, Pattern(seed, firstBlock, blocks), options, cts.Token).AsTask();
        if (await Task.WhenAny(write, Task.Delay(Patience)) != write)
        {
            Assert.Fail($"write of block {firstBlock}+{blocks} did not finish: {Volume.Engine.Query(Volume.Engine.Describe)}; log: {string.Join(" | ", Log.Lines.Select(l => l.Message))}");
        }
        await write;
    }

    public async Task<byte[]> ReadAsync(long firstBlock, int blocks = 1)
    {
        using var cts = new CancellationTokenSource(Patience);
        byte[] data = new byte[blocks * BlockSize];
        Task read = Volume.ReadAsync(firstBlock * BlockSize, data, cts.Token).AsTask();
        if (await Task.WhenAny(read, Task.Delay(Patience)) != read)
        {
            Assert.Fail($"read of block {firstBlock}+{blocks} did not finish: {Volume.Engine.Query(Volume.Engine.Describe)}");
        }
        await read;
        return data;
    }

    public async Task FlushAsync()
    {
        using var cts = new CancellationTokenSource(Patience);
        await Volume.FlushAsync(cts.Token);
    }

    // ------------------------------------------------------------ waiting and checking

    public static async Task WaitUntilAsync(Func<bool> condition, string what, TimeSpan? timeout = null)
    {
        var clock = Stopwatch.StartNew();
        TimeSpan limit = timeout ?? Patience;
        while (!condition())
        {
            if (clock.Elapsed > limit)
            {
                Assert.Fail($"timed out after {limit.TotalSeconds:0.#} s waiting until {what}");
            }
            await Task.Delay(10);
        }
    }

    /// <summary>
    /// Moves a fake clock <paramref name="step"/> at a time until the condition holds, and only while no
    /// replica has work outstanding: time passes for what waits on it (reconnect backoff, repair pacing,
    /// scrub intervals) but never past a deadline for a reply that is merely slow in real time.
    /// </summary>
    public async Task AdvanceUntilAsync(FakeTimeProvider clock, Func<bool> condition, string what, TimeSpan? step = null)
    {
        var real = Stopwatch.StartNew();
        while (!condition())
        {
            if (real.Elapsed > Patience)
            {
                Assert.Fail($"timed out after {Patience.TotalSeconds:0.#} s (fake clock at {clock.GetUtcNow():HH:mm:ss.fff}) waiting until {what}");
            }
            if (Volume.GetStatus().Replicas.All(r => r.OutstandingJobs == 0))
            {
                clock.Advance(step ?? Engine.TickInterval);
            }
            await Task.Delay(2);
        }
    }

    /// <summary>Moves a fake clock by <paramref name="span"/> one tick at a time, so the engine sees every tick on the way.</summary>
    public static void Advance(FakeTimeProvider clock, TimeSpan span)
    {
        for (TimeSpan moved = TimeSpan.Zero; moved < span; moved += Engine.TickInterval)
        {
            clock.Advance(span - moved < Engine.TickInterval ? span - moved : Engine.TickInterval);
        }
    }

    /// <summary>
    /// Returns once the engine has applied every reply the fakes handed it so far and delivered whatever
    /// those replies decided. A guest read posted now is applied after those replies (the loop takes
    /// events in order), and its completion is delivered after theirs (in order, at the end of a turn),
    /// inline — so when it returns, a guest task still running was not decided by them: "not yet" is a
    /// fact, not a timing. The read goes to the least-loaded replica: the test must leave one free.
    /// </summary>
    public async Task RepliesAppliedAsync()
    {
        long lastBlock = ((long)ExtentCount * ExtentBlocks) - 1; // no test writes it: nothing orders the read behind a held write
        await ReadAsync(lastBlock);
    }

    public Task WaitForStateAsync(int replica, ReplicaState state) =>
        WaitUntilAsync(() => Status(replica).State == state, $"replica {replica} is {state} (now {Status(replica).State}, last fault: {Status(replica).LastFault ?? "none"})");

    public Task WaitForIdleAsync() =>
        WaitUntilAsync(() => Volume.GetStatus().Replicas.All(r => r.OutstandingJobs == 0), "no replica has work outstanding");

    public Task WaitForAllActiveAsync() =>
        WaitUntilAsync(() => Volume.GetStatus().Replicas.All(r => r.State == ReplicaState.Active), "all three replicas are active");

    /// <summary>True once the task completed; false if it is still running after <paramref name="wait"/>.</summary>
    public static async Task<bool> CompletesWithinAsync(Task task, TimeSpan wait)
    {
        await Task.WhenAny(task, Task.Delay(wait));
        return task.IsCompleted;
    }

    /// <summary>Asserts the three fakes hold the same blocks, hashes and (optionally) extent metadata.</summary>
    public void AssertReplicasIdentical(bool includeMeta = true)
    {
        var (data0, hashes0, meta0) = Replicas[0].Snapshot();
        for (int r = 1; r < 3; r++)
        {
            var (data, hashes, meta) = Replicas[r].Snapshot();
            var differing = Enumerable.Range(0, ExtentCount).Where(e =>
                !data.AsSpan(e * ExtentBytes, ExtentBytes).SequenceEqual(data0.AsSpan(e * ExtentBytes, ExtentBytes))
                || !hashes.AsSpan(e * ExtentBlocks, ExtentBlocks).SequenceEqual(hashes0.AsSpan(e * ExtentBlocks, ExtentBlocks))).ToList();
            Assert.That(differing, Is.Empty, $"extents whose blocks differ between replica 0 and replica {r}");
            if (includeMeta)
            {
                Assert.That(meta, Is.EqualTo(meta0), $"extent metadata of replica {r} vs replica 0");
            }
        }
    }

    public async ValueTask DisposeAsync()
    {
        foreach (FakeReplica replica in Replicas)
        {
            replica.Release();
            replica.OpDelay = TimeSpan.Zero;
        }
        if (_volume is not null)
        {
            await _volume.DisposeAsync();
        }
    }
}

/// <summary>Keeps the engine's log lines so tests can check that a fault says why.</summary>
internal sealed class ListLogger : ILogger
{
    private readonly ConcurrentQueue<(LogLevel Level, string Message)> _lines = new();

    public IReadOnlyList<(LogLevel Level, string Message)> Lines => [.. _lines];

    public IEnumerable<string> Warnings => _lines.Where(l => l.Level >= LogLevel.Warning).Select(l => l.Message);

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        _lines.Enqueue((logLevel, formatter(state, exception)));
}

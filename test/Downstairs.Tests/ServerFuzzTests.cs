using System.Diagnostics;
using System.IO.Hashing;
using System.IO.Pipelines;
using Nerdbank.Streams;
using NbdServer.Protocol;
using NbdServer.Downstairs.Server;
using NbdServer.Downstairs.Storage;
using NbdServer.Testing;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// Random and mutated frames into an in-process downstairs, as a stranger (read-only) or a broken
/// writer would send them: the server answers or closes each connection, a real client keeps being
/// served meanwhile and afterwards, and the region only changes where the protocol lets a writer
/// change it. Seeded; the seed is printed (NBD_FUZZ_SEED replays it); NBD_FUZZ_SECONDS runs longer.
/// </summary>
[TestFixture]
[Category("Fuzz")]
[CancelAfter(Fuzz.MaxSeconds * 1000 + 120_000)]
public sealed class ServerFuzzTests
{
    private const int BlockSize = 4096;
    private const int ExtentBlocks = 512;
    private const int MaxFrameBytes = 1 << 20;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);

    private TempDir _dir = null!;
    private ListLogger _log = null!;
    private RegionHost _host = null!;
    private DownstairsServer _server = null!;

    [SetUp]
    public void SetUp()
    {
        _dir = new TempDir();
        _log = new ListLogger();
        Region region = Region.Create(_dir.Sub("r"), 8 << 20, BlockSize, ExtentBlocks, preallocate: false);
        // One IO thread: a job that kills its thread would leave nobody to serve the real client's read.
        _host = new RegionHost(region, new DownstairsOptions { DataDir = _dir.Sub("r"), MaxFrameBytes = MaxFrameBytes, MaxBytesPerConnection = 8 << 20, IoThreads = 1 }, _log);
        _server = new DownstairsServer(_host);
    }

    [TearDown]
    public async Task TearDown()
    {
        await _server.DisposeAsync();
        _host.Dispose();
        _dir.Dispose();
    }

    private long BlockCount => _host.Region.Geometry.BlockCount;

    private int ExtentCount => _host.Region.Geometry.ExtentCount;

    private (Stream Client, Task Served) Pair()
    {
        var options = new PipeOptions(pauseWriterThreshold: 4 << 20, resumeWriterThreshold: 2 << 20);
        (Stream a, Stream b) = FullDuplexStream.CreatePair(options);
        return (a, _server.ServeAsync(b));
    }

    private static HelloRequest RealHello(ulong generation, bool readOnly) =>
        new(Wire.ProtocolVersion, readOnly, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), generation);

    [Test]
    public Task Random_frames_on_read_only_connections_change_nothing_and_a_real_client_keeps_being_served() =>
        FuzzAsync(readOnly: true, avoidRangeOverflow: true, Fuzz.Budget(5));

    [Test]
    public Task Random_frames_from_a_writer_stay_inside_the_region_and_a_real_client_keeps_being_served() =>
        FuzzAsync(readOnly: false, avoidRangeOverflow: true, Fuzz.Budget(5));

    [Test]
    public Task Range_overflow_frames_do_not_kill_the_downstairs() =>
        FuzzAsync(readOnly: false, avoidRangeOverflow: false, Fuzz.Budget(5));

    private async Task FuzzAsync(bool readOnly, bool avoidRangeOverflow, TimeSpan budget)
    {
        int seed = Fuzz.Seed();
        const ulong writerGeneration = 5;
        var fuzzer = Guid.NewGuid();
        string regionDir = _dir.Sub("r");
        await SeedRegionAsync();
        Dictionary<string, ulong> before = Snapshot(regionDir);
        string[] outsideBefore = OutsideRegion();

        // The real client reads all along; it is read-only, so the fuzzing writer can't fence it.
        (Stream realStream, _) = Pair();
        await using DownstairsClient real = await DownstairsClient.ConnectAsync(realStream, RealHello(0, readOnly: true));
        ulong realJobs = 0;

        var clock = Stopwatch.StartNew();
        int iteration = 0;
        for (; iteration < Fuzz.MaxIterations && clock.Elapsed < budget; iteration++)
        {
            var rng = new Random(seed + iteration);
            byte[] hello = rng.Next(10) == 0
                ? Fuzz.Mutate(rng, FrameFuzzer.Hello(readOnly, writerGeneration, fuzzer, Guid.NewGuid()))
                : FrameFuzzer.Hello(readOnly, writerGeneration, fuzzer);
            byte[] input = [.. hello, .. FrameFuzzer.Session(rng, BlockSize, BlockCount, ExtentCount, avoidRangeOverflow)];
            if (avoidRangeOverflow)
            {
                FrameFuzzer.AvoidRangeOverflow(input, MaxFrameBytes);
            }
            (Stream client, Task served) = Pair();
            using (var cancel = new CancellationTokenSource(Patience))
            {
                Task<long> drained = Fuzz.DrainAsync(client, cancel.Token);
                try
                {
                    await Fuzz.WriteInPiecesAsync(client, rng, input, cancel.Token);
                }
                catch (IOException)
                {
                    // The server closed on a bad frame before we finished: allowed.
                }
                // Half the time the fuzzer hangs up at once, half the time it waits for the answers first.
                if (rng.Next(2) == 0)
                {
                    await Task.WhenAny(drained, Task.Delay(20, CancellationToken.None));
                }
                await client.DisposeAsync();
                Assert.That(await Completes(served), Is.True, $"the server did not end the connection; {Fuzz.Replay(seed, iteration)}");
                await drained;
            }
            if (iteration % 16 == 0)
            {
                Assert.That(await ServesAsync(real, ++realJobs, checkContent: readOnly), Is.True, $"the real client was not served; {Fuzz.Replay(seed, iteration)}\n{LastLog()}");
            }
        }
        TestContext.Out.WriteLine($"{iteration} fuzz connections in {clock.Elapsed.TotalSeconds:0.0} s");

        Assert.That(await ServesAsync(real, ++realJobs, checkContent: readOnly), Is.True, $"the real client was not served after fuzzing; seed {seed}\n{LastLog()}");
        Assert.That(OutsideRegion(), Is.EqualTo(outsideBefore), $"files appeared outside the region; seed {seed}");
        if (readOnly)
        {
            Assert.That(Snapshot(regionDir), Is.EqualTo(before), $"a read-only connection changed the region; seed {seed}");
        }
        else
        {
            AssertRegionShape(regionDir, before, seed);
            // A newer writer takes over and is served: the fuzzing writer left the region usable.
            (Stream s, _) = Pair();
            ulong next = _host.Region.HighestGeneration + 1;
            Assume.That(next, Is.GreaterThan(0UL), "the fuzzing writer's Hello stored generation 2^64-1 (ds-harden bounds it)");
            await using DownstairsClient writer = await DownstairsClient.ConnectAsync(s, RealHello(next, readOnly: false));
            byte[] block = TestData.Block(BlockSize, 3, seed);
            Assert.That((await writer.WriteAsync(1, 3, block)).IsOk, Is.True, $"seed {seed}");
            byte[] back = new byte[BlockSize];
            Assert.That((await writer.ReadAsync(2, 3, back)).IsOk, Is.True, $"seed {seed}");
            Assert.That(back, Is.EqualTo(block), $"seed {seed}");
        }
    }

    /// <summary>Some written blocks, so reads of the fuzzer's have something to return and a change would show.</summary>
    private async Task SeedRegionAsync()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, RealHello(1, readOnly: false));
        for (int i = 0; i < 8; i++)
        {
            long block = i * 250L;
            Assert.That((await c.WriteAsync((ulong)i + 1, block, TestData.Block(BlockSize, block, 1))).IsOk, Is.True);
        }
        Assert.That((await c.FlushAsync(100, 1, 1)).IsOk, Is.True);
    }

    /// <summary>A read of a seeded block and a ping, each answered within the patience.</summary>
    /// <remarks>A fuzzing writer may legitimately rewrite the block, so its content is checked only against read-only fuzzing.</remarks>
    private static async Task<bool> ServesAsync(DownstairsClient real, ulong job, bool checkContent)
    {
        byte[] back = new byte[BlockSize];
        Task<DownstairsResult> read = real.ReadAsync(job, 250, back);
        if (!await Completes(read) || !read.Result.IsOk || (checkContent && !back.AsSpan().SequenceEqual(TestData.Block(BlockSize, 250, 1))))
        {
            return false;
        }
        Task<TimeSpan> ping = real.PingAsync();
        return await Completes(ping) && ping.IsCompletedSuccessfully;
    }

    private static async Task<bool> Completes(Task task)
    {
        await Task.WhenAny(task, Task.Delay(Patience, CancellationToken.None));
        return task.IsCompleted;
    }

    /// <summary>After a writer's fuzzing: only the region's own files (and repair staging copies), no extent file beyond its size (data and block contexts).</summary>
    private void AssertRegionShape(string regionDir, Dictionary<string, ulong> before, int seed)
    {
        long extentBytes = _host.Region.Geometry.ExtentFileBytes;
        foreach (string file in Directory.EnumerateFiles(regionDir, "*", SearchOption.AllDirectories).Where(f => Path.GetFileName(f) != RegionLayout.LockFileName))
        {
            string name = Path.GetRelativePath(regionDir, file);
            string original = name.EndsWith(RegionLayout.StagingSuffix, StringComparison.Ordinal) ? name[..^RegionLayout.StagingSuffix.Length] : name;
            Assert.That(before.ContainsKey(original) || name.StartsWith(RegionLayout.ExtentDirName, StringComparison.Ordinal), Is.True, $"unexpected file {name}; seed {seed}");
            if (name.StartsWith(RegionLayout.ExtentDirName, StringComparison.Ordinal))
            {
                Assert.That(new FileInfo(file).Length, Is.LessThanOrEqualTo(extentBytes), $"{name} grew beyond an extent; seed {seed}");
            }
        }
        Assert.That(Directory.EnumerateFiles(Path.Combine(regionDir, RegionLayout.ExtentDirName)).Count(f => !f.EndsWith(RegionLayout.StagingSuffix, StringComparison.Ordinal)),
            Is.EqualTo(ExtentCount), $"extent files appeared or vanished; seed {seed}");
    }

    private string[] OutsideRegion() =>
        [.. Directory.EnumerateFileSystemEntries(_dir.Path).Where(p => Path.GetFileName(p) != "r").Order(StringComparer.Ordinal)];

    private static Dictionary<string, ulong> Snapshot(string dir) =>
        Directory.EnumerateFiles(dir, "*", SearchOption.AllDirectories)
            .Where(f => Path.GetFileName(f) != RegionLayout.LockFileName)
            .ToDictionary(f => Path.GetRelativePath(dir, f), f => XxHash3.HashToUInt64(File.ReadAllBytes(f)), StringComparer.Ordinal);

    private string LastLog() => string.Join('\n', _log.Lines.TakeLast(20));
}

using System.IO.Pipelines;
using System.Net;
using Nerdbank.Streams;
using NbdServer.Protocol;
using NbdServer.Downstairs.Server;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// Attacks on an in-process downstairs, each written as the attack: the honest upstairs keeps being
/// served and nothing on disk changes.
/// </summary>
[CancelAfter(30_000)]
public sealed class HostileInProcessTests
{
    private TempDir _dir = null!;
    private ListLogger _log = null!;
    private RegionHost _host = null!;
    private DownstairsServer _server = null!;

    private string RegionDir => _dir.Sub("r");

    [SetUp]
    public void SetUp()
    {
        _dir = new TempDir();
        _log = new ListLogger();
        Start(new DownstairsOptions { DataDir = "", MaxFrameBytes = 4 << 20, MaxBytesPerConnection = 8 << 20 });
    }

    private void Start(DownstairsOptions options)
    {
        Region region = Directory.Exists(RegionDir) ? Region.Open(RegionDir) : Region.Create(RegionDir, 8 << 20, 4096, 512, preallocate: false);
        _host = new RegionHost(region, options with { DataDir = RegionDir }, _log);
        _server = new DownstairsServer(_host);
    }

    private async Task RestartAsync(DownstairsOptions options)
    {
        await _server.DisposeAsync();
        _host.Dispose();
        Start(options);
    }

    [TearDown]
    public async Task TearDown()
    {
        await _server.DisposeAsync();
        _host.Dispose();
        _dir.Dispose();
    }

    private Stream Connect()
    {
        var options = new PipeOptions(pauseWriterThreshold: 4 << 20, resumeWriterThreshold: 2 << 20);
        (Stream a, Stream b) = FullDuplexStream.CreatePair(options);
        _ = _server.ServeAsync(b);
        return a;
    }

    private static HelloRequest Hello(ulong generation, bool readOnly = false, Guid? upstairs = null) =>
        new(Wire.ProtocolVersion, readOnly, Guid.Empty, upstairs ?? Guid.NewGuid(), Guid.NewGuid(), generation);

    /// <summary>The honest upstairs: connected read-write, one block written and flushed.</summary>
    private async Task<(DownstairsClient Client, byte[] Block)> HonestAsync(ulong generation, Guid? upstairs = null)
    {
        DownstairsClient c = await DownstairsClient.ConnectAsync(Connect(), Hello(generation, upstairs: upstairs));
        byte[] block = TestData.Block(4096, 700, 1);
        Assert.That((await c.WriteAsync(1, 700, block)).IsOk, Is.True);
        Assert.That((await c.FlushAsync(2, 1, generation)).IsOk, Is.True);
        return (c, block);
    }

    private static async Task AssertStillServedAsync(DownstairsClient honest, byte[] block)
    {
        Assert.That(await honest.PingAsync(), Is.LessThan(TimeSpan.FromSeconds(10)));
        byte[] back = new byte[4096];
        Assert.That((await honest.ReadAsync(100, 700, back)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(block));
    }

    private static async Task<ResultCode> RawHelloAsync(Stream s, ulong generation, bool readOnly)
    {
        var peer = new RawPeer(s);
        return await peer.HelloAsync(generation, readOnly);
    }

    [Test]
    public async Task Hello_with_generation_2_pow_64_minus_1_or_beyond_the_step_is_refused_and_not_recorded()
    {
        (DownstairsClient honest, byte[] block) = await HonestAsync(5);
        await using (honest)
        {
            string before = DiskState.Of(RegionDir);
            DownstairsOptions d = _host.Options;
            Assert.That(await RawHelloAsync(Connect(), ulong.MaxValue, readOnly: false), Is.EqualTo(ResultCode.Invalid), "the one-packet brick");
            Assert.That(await RawHelloAsync(Connect(), 5 + d.MaxGenerationStep + 1, readOnly: false), Is.EqualTo(ResultCode.Invalid), "one more than the step");
            Assert.That(_host.Region.HighestGeneration, Is.EqualTo(5UL));
            Assert.That(DiskState.Of(RegionDir), Is.EqualTo(before), "no generation recorded");
            Assert.That(await honest.PingAsync(), Is.LessThan(TimeSpan.FromSeconds(10)));
            Assert.That((await honest.WriteAsync(3, 701, TestData.Block(4096, 701, 1))).IsOk, Is.True, "the honest writer was not fenced");
            await AssertStillServedAsync(honest, block);
        }
        // The largest allowed raise still works (an honest jump, e.g. an explicit --generation).
        Assert.That(await RawHelloAsync(Connect(), 5 + _host.Options.MaxGenerationStep, readOnly: false), Is.EqualTo(ResultCode.Ok));
    }

    [Test]
    public async Task Generation_0_is_never_valid_for_a_writer_even_on_a_fresh_region()
    {
        string before = DiskState.Of(RegionDir);
        Assert.That(await RawHelloAsync(Connect(), 0, readOnly: false), Is.EqualTo(ResultCode.Invalid));
        Assert.That(DiskState.Of(RegionDir), Is.EqualTo(before));
        Assert.That(await RawHelloAsync(Connect(), 0, readOnly: true), Is.EqualTo(ResultCode.Ok), "the read-only probe still works");
    }

    [Test]
    public async Task Flush_with_a_forged_generation_is_refused_and_stamps_nothing()
    {
        (DownstairsClient writer, byte[] block) = await HonestAsync(5);
        await using (writer)
        {
            Assert.That((await writer.WriteAsync(3, 1100, TestData.Block(4096, 1100, 1))).IsOk, Is.True);
            ExtentMeta before = _host.Region.GetExtentMeta(2);
            // A generation far above its own would make this extent win every later reconciliation.
            Assert.That((await writer.FlushAsync(4, 2, 1_000_000_000)).Code, Is.EqualTo(ResultCode.Invalid));
            Assert.That((await writer.FlushAsync(5, 2, 4)).Code, Is.EqualTo(ResultCode.Invalid), "nor below it");
            Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(before), "nothing stamped");
            Assert.That(_host.Region.HighestGeneration, Is.EqualTo(5UL));
            Assert.That((await writer.FlushAsync(6, 2, 5)).IsOk, Is.True, "the honest flush still works");
            Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(new ExtentMeta(5, 2, false)));
            await AssertStillServedAsync(writer, block);
        }
    }

    [Test]
    public async Task Flush_number_beyond_the_maximum_is_refused()
    {
        (DownstairsClient writer, byte[] block) = await HonestAsync(5);
        await using (writer)
        {
            Assert.That((await writer.WriteAsync(3, 1100, TestData.Block(4096, 1100, 1))).IsOk, Is.True);
            ExtentMeta before = _host.Region.GetExtentMeta(2);
            Assert.That((await writer.FlushAsync(4, ulong.MaxValue, 5)).Code, Is.EqualTo(ResultCode.Invalid), "the upstairs would compute max + 1 = 0");
            Assert.That((await writer.FlushAsync(5, 0, 5)).Code, Is.EqualTo(ResultCode.Invalid), "flush numbers start at 1");
            Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(before));
            await AssertStillServedAsync(writer, block);
        }
    }

    [Test]
    public async Task Flush_number_at_the_ceiling_or_beyond_the_flush_step_is_refused_and_the_region_keeps_its_flush_number()
    {
        (DownstairsClient writer, byte[] block) = await HonestAsync(5);
        await using (writer)
        {
            ulong step = _host.Options.MaxFlushStep;
            Assert.That((await writer.WriteAsync(3, 1100, TestData.Block(4096, 1100, 1))).IsOk, Is.True);
            ExtentMeta before = _host.Region.GetExtentMeta(2);
            // The one-packet brick: recorded, every later flush (ceiling + 1) would be refused everywhere.
            Assert.That((await writer.FlushAsync(4, Wire.MaxFlushNumber, 5)).Code, Is.EqualTo(ResultCode.Invalid), "the ceiling itself");
            Assert.That((await writer.FlushAsync(5, Wire.MaxFlushNumber - 1, 5)).Code, Is.EqualTo(ResultCode.Invalid), "one below the ceiling, far beyond the step");
            Assert.That((await writer.FlushAsync(6, 1 + step + 1, 5)).Code, Is.EqualTo(ResultCode.Invalid), "one more than the step above the recorded 1");
            Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(before), "nothing stamped");
            Assert.That(_host.Region.HighestFlushRecorded, Is.EqualTo(1UL));
            // An upstairs ahead by the flushes this replica missed is still served.
            Assert.That((await writer.FlushAsync(7, 1 + step, 5)).IsOk, Is.True, "exactly the step");
            Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(new ExtentMeta(5, 1 + step, false)));
            await AssertStillServedAsync(writer, block);
        }
    }

    [Test]
    public async Task Flush_step_is_measured_from_the_record_so_repeated_flushes_cannot_ratchet_it_up()
    {
        (DownstairsClient writer, byte[] block) = await HonestAsync(5);
        await using (writer)
        {
            ulong step = _host.Options.MaxFlushStep;
            // Empty flushes up to the step are accepted but record nothing (no extent is dirty) ...
            Assert.That((await writer.FlushAsync(3, 1 + step, 5)).IsOk, Is.True);
            // ... so the next one is still measured from the recorded 1, not from what was sent.
            Assert.That((await writer.FlushAsync(4, 1 + step + step, 5)).Code, Is.EqualTo(ResultCode.Invalid));
            Assert.That(_host.Region.HighestFlushRecorded, Is.EqualTo(1UL));
            await AssertStillServedAsync(writer, block);
        }
    }

    [TestCase(6UL, 1UL, TestName = "ExtentCommit with a generation above the connection's is refused")]
    [TestCase(4UL, Wire.MaxFlushNumber, TestName = "ExtentCommit with the flush number ceiling itself is refused")]
    [TestCase(4UL, Wire.MaxFlushNumber - 1, TestName = "ExtentCommit with a flush number beyond the flush step is refused")]
    [TestCase(5UL, 999UL, TestName = "ExtentCommit claiming a flush of its own generation that never happened is refused")]
    [TestCase(4UL, ulong.MaxValue, TestName = "ExtentCommit with a flush number beyond the maximum is refused")]
    public async Task Forged_extent_commit_is_refused_and_the_extent_is_unchanged(ulong generation, ulong flush)
    {
        (DownstairsClient writer, byte[] block) = await HonestAsync(5);
        await using (writer)
        {
            string before = DiskState.Of(RegionDir);
            byte[] ctx = new byte[512 * 16];
            byte[] data = new byte[512 * 4096];
            Assert.That((await writer.WriteExtentAsync(3, new ExtentRange(1, 0, 512, ExtentRange.BeginFlag), ctx, data)).IsOk, Is.True);
            DownstairsResult r = await writer.CommitExtentAsync(4, 1, new ExtentMeta(generation, flush, false));
            Assert.That(r.Code, Is.EqualTo(ResultCode.Invalid), r.ToString());
            Assert.That(DiskState.Of(RegionDir), Is.EqualTo(before), "the extent and its record are unchanged");
            await AssertStillServedAsync(writer, block);
        }
    }

    [Test]
    public async Task Honest_repair_commits_are_accepted_older_generation_and_own_flushes()
    {
        Guid upstairs = Guid.NewGuid();
        (DownstairsClient writer, _) = await HonestAsync(5, upstairs);
        await using (writer)
        {
            byte[] ctx = new byte[512 * 16];
            byte[] data = new byte[512 * 4096];
            // Reconciliation: a healthy copy from an older generation with a flush this replica never saw.
            await writer.WriteExtentAsync(3, new ExtentRange(1, 0, 512, ExtentRange.BeginFlag), ctx, data);
            Assert.That((await writer.CommitExtentAsync(4, 1, new ExtentMeta(4, 900, false))).IsOk, Is.True);
            // Live repair: the engine announces its current flush number (a flush after marking the
            // extents pending), then commits copies stamped up to it.
            Assert.That((await writer.MarkRepairPendingAsync(5, [2])).IsOk, Is.True);
            Assert.That((await writer.FlushAsync(6, 57, 5)).IsOk, Is.True);
            await writer.WriteExtentAsync(7, new ExtentRange(2, 0, 512, ExtentRange.BeginFlag), ctx, data);
            Assert.That((await writer.CommitExtentAsync(8, 2, new ExtentMeta(5, 57, false))).IsOk, Is.True);
            Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(new ExtentMeta(5, 57, false)));
        }
        // The same upstairs reconnecting (same generation) may claim what the region durably recorded for it.
        await using DownstairsClient again = await DownstairsClient.ConnectAsync(Connect(), Hello(5, upstairs: upstairs));
        await again.WriteExtentAsync(1, new ExtentRange(3, 0, 1, ExtentRange.BeginFlag), new byte[16], new byte[4096]);
        Assert.That((await again.CommitExtentAsync(2, 3, new ExtentMeta(5, 57, false))).IsOk, Is.True);
    }

    /// <summary>Restarts the server listening on loopback TCP (the accept loop is what applies the pre-Hello limit).</summary>
    private async Task<IPEndPoint> ListenAsync(DownstairsOptions options)
    {
        await RestartAsync(options with { Listen = new IPEndPoint(IPAddress.Loopback, 0) });
        return _server.Start();
    }

    private static HelloRequest HelloFor(ulong generation, bool readOnly = false) => Hello(generation, readOnly);

    [Test]
    public async Task Clients_that_reset_right_after_connecting_do_not_stop_the_listener()
    {
        IPEndPoint endpoint = await ListenAsync(_host.Options);
        for (int i = 0; i < 20; i++)
        {
            using var s = new System.Net.Sockets.Socket(System.Net.Sockets.SocketType.Stream, System.Net.Sockets.ProtocolType.Tcp);
            await s.ConnectAsync(endpoint);
            s.LingerState = new System.Net.Sockets.LingerOption(true, 0); // close sends RST
        }
        await using DownstairsClient writer = await DownstairsClient.ConnectAsync(endpoint, HelloFor(1));
        byte[] block = TestData.Block(4096, 3, 1);
        Assert.That((await writer.WriteAsync(1, 3, block)).IsOk, Is.True);
    }

    [Test]
    public async Task Idle_connections_at_the_limit_do_not_lock_out_the_writer()
    {
        IPEndPoint endpoint = await ListenAsync(_host.Options with { MaxConnections = 4 });
        var strangers = new List<RawPeer>();
        try
        {
            for (int i = 0; i < 4; i++)
            {
                RawPeer p = await RawPeer.ConnectAsync(endpoint);
                strangers.Add(p);
                Assert.That(await p.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Ok));
            }
            for (int i = 0; i < 6; i++)
            {
                strangers.Add(await RawPeer.ConnectAsync(endpoint)); // silent: never says Hello
            }
            await Task.Delay(200);

            await using DownstairsClient writer = await DownstairsClient.ConnectAsync(endpoint, HelloFor(1));
            byte[] block = TestData.Block(4096, 700, 1);
            Assert.That((await writer.WriteAsync(1, 700, block)).IsOk, Is.True);
            await AssertStillServedAsync(writer, block);

            RawPeer extra = await RawPeer.ConnectAsync(endpoint);
            strangers.Add(extra);
            Assert.That(await extra.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Unavailable), "a fifth reader is refused with a clear error");
        }
        finally
        {
            foreach (RawPeer p in strangers)
            {
                await p.DisposeAsync();
            }
        }
    }

    [Test]
    public async Task Silent_connection_after_Hello_is_closed_at_the_idle_timeout_and_a_pinging_client_stays()
    {
        IPEndPoint endpoint = await ListenAsync(_host.Options with { IdleTimeout = TimeSpan.FromSeconds(1) });
        await using DownstairsClient writer = await DownstairsClient.ConnectAsync(endpoint, HelloFor(1), new DownstairsClientOptions { PingInterval = TimeSpan.FromMilliseconds(200) });
        await using RawPeer idle = await RawPeer.ConnectAsync(endpoint);
        Assert.That(await idle.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Ok));
        Assert.That(await idle.ClosedByPeerAsync().WaitAsync(TimeSpan.FromSeconds(10)), Is.True);
        await Task.Delay(500);
        Assert.That(writer.Failure, Is.Null, "the client that pings when idle keeps its connection");
        Assert.That((await writer.WriteAsync(1, 5, TestData.Block(4096, 5, 1))).IsOk, Is.True);
        Assert.That(_log.Lines, Has.Some.Contains("--idle-timeout"));
    }

    [Test]
    public async Task Frame_body_trickled_slower_than_the_frame_timeout_is_cut_off()
    {
        IPEndPoint endpoint = await ListenAsync(_host.Options with { FrameTimeout = TimeSpan.FromSeconds(1) });
        await using DownstairsClient writer = await DownstairsClient.ConnectAsync(endpoint, HelloFor(1));
        await using RawPeer slow = await RawPeer.ConnectAsync(endpoint);
        Assert.That(await slow.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Ok));
        // A Write announcing 256 blocks, then its body one byte at a time: never idle, never done.
        byte[] header = new byte[Wire.HeaderSize];
        FrameReader.WriteHeader(header, MessageType.Write, ResultCode.Ok, 1, BlockRange.FixedSize + (256 * (8 + 4096)));
        await slow.SendAsync(header);
        Task<bool> closed = slow.ClosedByPeerAsync();
        for (int i = 0; i < 100 && !closed.IsCompleted; i++)
        {
            try
            {
                await slow.Stream.WriteAsync(new byte[1]);
            }
            catch (IOException)
            {
                break;
            }
            await Task.Delay(100);
        }
        Assert.That(closed.IsCompleted, Is.True, "closed within 10 s");
        Assert.That((await writer.WriteAsync(1, 5, TestData.Block(4096, 5, 1))).IsOk, Is.True);
        Assert.That(_log.Lines, Has.Some.Contains("--frame-timeout"));
    }

    [Test]
    [CancelAfter(60_000)]
    public async Task A_reader_that_never_takes_its_replies_is_closed_at_the_send_timeout()
    {
        IPEndPoint endpoint = await ListenAsync(_host.Options with { SendTimeout = TimeSpan.FromSeconds(1) });
        await using DownstairsClient writer = await DownstairsClient.ConnectAsync(endpoint, HelloFor(1));
        await using RawPeer hog = await RawPeer.ConnectAsync(endpoint);
        Assert.That(await hog.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Ok));
        // 1 MiB reads, pipelined, and not one reply byte read back: the socket buffers fill, the
        // sender stalls, and the reader waits on the connection's byte budget, not on the socket.
        byte[] body = new byte[BlockRange.FixedSize];
        new BlockRange(0, 256).Write(body);
        for (ulong job = 1; job <= 100; job++)
        {
            await hog.SendAsync(RawPeer.Frame(MessageType.Read, job, body));
        }
        Assert.That(() => _log.Lines.Any(l => l.Contains("--send-timeout", StringComparison.Ordinal)), Is.True.After(15_000).MilliSeconds.PollEvery(50).MilliSeconds,
            "the stalled connection was closed for not taking its replies");
        Assert.That((await writer.WriteAsync(1, 5, TestData.Block(4096, 5, 1))).IsOk, Is.True, "the writer is served meanwhile");
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task A_stranger_sending_garbage_10000_times_yields_a_few_log_lines_with_counts()
    {
        IPEndPoint endpoint = await ListenAsync(_host.Options with { LogSummaryInterval = TimeSpan.FromSeconds(1) });
        await using DownstairsClient writer = await DownstairsClient.ConnectAsync(endpoint, HelloFor(1));
        int before = _log.Lines.Count;
        byte[] garbage = "GET / HTTP/1.1\r\nHost: x\r\n\r\n"u8.ToArray();
        byte[] badHello = RawPeer.Frame(MessageType.Hello, 0, RawPeer.HelloBody(0, readOnly: false));
        int attempts = 0;
        await Parallel.ForAsync(0, 10_000, new ParallelOptions { MaxDegreeOfParallelism = 8 }, async (i, ct) =>
        {
            Interlocked.Increment(ref attempts);
            await using RawPeer p = await RawPeer.ConnectAsync(endpoint);
            // Mostly garbage; every tenth a Hello that is refused (generation 0), every tenth a read-only probe.
            if (i % 10 == 5)
            {
                await p.HelloAsync(0, readOnly: true);
                return; // hangs up itself
            }
            await p.SendAsync(i % 10 == 0 ? badHello : garbage);
            await ((Task)p.ClosedByPeerAsync().WaitAsync(TimeSpan.FromSeconds(5), ct)).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        });
        await Task.Delay(2500); // a summary interval or two
        string[] lines = [.. _log.Lines.Skip(before)];
        Assert.That(attempts, Is.EqualTo(10_000));
        Assert.That(lines, Has.Length.LessThan(30), string.Join("\n", lines.Take(40)));
        Assert.That(lines, Has.Some.Contains("repeated"), "the repeats are counted");
        Assert.That((await writer.WriteAsync(1, 5, TestData.Block(4096, 5, 1))).IsOk, Is.True, "the writer is still served");
    }

    [Test]
    public async Task A_fenced_writer_gets_fenced_answers_and_none_of_its_writes_land()
    {
        (DownstairsClient writer, byte[] block) = await HonestAsync(1);
        await using (writer)
        {
            // The read-only probe (what the engine does first) works for anyone and fences no one.
            await using (var probe = new RawPeer(Connect()))
            {
                Assert.That(await probe.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Ok));
            }
            Assert.That((await writer.WriteAsync(3, 701, TestData.Block(4096, 701, 1))).IsOk, Is.True, "the probe fenced no one");
            Assert.That((await writer.FlushAsync(4, 2, 1)).IsOk, Is.True);

            // A newer writer (the attack TLS closes: one above the disclosed highest generation) takes over.
            await using DownstairsClient newer = await DownstairsClient.ConnectAsync(Connect(), Hello(2));
            string extents = DiskState.Of(Path.Combine(RegionDir, "extents"));
            ExtentMeta[] meta = _host.Region.GetAllExtentMeta();

            Assert.That((await writer.WriteAsync(5, 702, TestData.Block(4096, 702, 1))).Code, Is.EqualTo(ResultCode.Fenced));
            Assert.That((await writer.FlushAsync(6, 3, 1)).Code, Is.EqualTo(ResultCode.Fenced));
            Assert.That((await writer.WriteExtentAsync(7, new ExtentRange(1, 0, 1, ExtentRange.BeginFlag), new byte[16], new byte[4096])).Code, Is.EqualTo(ResultCode.Fenced));
            Assert.That((await writer.CommitExtentAsync(8, 1, new ExtentMeta(1, 2, false))).Code, Is.EqualTo(ResultCode.Fenced));
            Assert.That((await writer.MarkRepairPendingAsync(9, [2])).Code, Is.EqualTo(ResultCode.Fenced));

            Assert.That(DiskState.Of(Path.Combine(RegionDir, "extents")), Is.EqualTo(extents), "no write of the fenced writer landed");
            Assert.That(_host.Region.GetAllExtentMeta(), Is.EqualTo(meta));
            Assert.That(_host.Region.IsRepairPending(2), Is.False);
            Assert.That((await newer.WriteAsync(1, 703, TestData.Block(4096, 703, 1))).IsOk, Is.True, "the new writer is served");
        }
    }
}

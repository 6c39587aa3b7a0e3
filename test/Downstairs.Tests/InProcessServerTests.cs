using System.Buffers.Binary;
using System.IO.Pipelines;
using Microsoft.Extensions.Logging;
using Nerdbank.Streams;
using NbdServer.Protocol;
using NbdServer.Downstairs.Server;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary>Protocol behaviour end to end, server and client in one process over an in-memory duplex pipe.</summary>
[CancelAfter(30_000)]
public sealed class InProcessServerTests
{
    private TempDir _dir = null!;
    private ListLogger _log = null!;
    private RegionHost _host = null!;
    private DownstairsServer _server = null!;

    [SetUp]
    public void SetUp()
    {
        _dir = new TempDir();
        _log = new ListLogger();
        Region region = Region.Create(_dir.Sub("r"), 8 << 20, 4096, 512, preallocate: false);
        _host = new RegionHost(region, new DownstairsOptions { DataDir = _dir.Sub("r"), MaxFrameBytes = 4 << 20, MaxBytesPerConnection = 8 << 20 }, _log);
        _server = new DownstairsServer(_host);
    }

    [TearDown]
    public async Task TearDown()
    {
        await _server.DisposeAsync();
        _host.Dispose();
        _dir.Dispose();
    }

    private (Stream Client, Task Served) Pair()
    {
        var options = new PipeOptions(pauseWriterThreshold: 4 << 20, resumeWriterThreshold: 2 << 20);
        (Stream a, Stream b) = FullDuplexStream.CreatePair(options);
        return (a, _server.ServeAsync(b));
    }

    private static HelloRequest Hello(ulong generation = 1, bool readOnly = false) => new(Wire.ProtocolVersion, readOnly, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), generation);

    [Test]
    public async Task Negotiation_reports_geometry_and_extent_state()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello());
        Assert.That((c.Region.BlockSize, c.Region.ExtentBlocks, c.Region.ExtentCount, c.Region.RegionBytes), Is.EqualTo((4096, 512, 4, 8L << 20)));
        Assert.That(c.Region.RegionId, Is.EqualTo(_host.Region.Uuid));
        Assert.That(c.Region.Extents, Has.All.EqualTo(new ExtentMeta(0, 0, false)));
    }

    [Test]
    public async Task Write_read_flush_round_trip_with_hashes()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello(3));
        byte[] data = [.. TestData.Block(4096, 510, 1), .. TestData.Block(4096, 511, 1), .. TestData.Block(4096, 512, 1)];
        Assert.That((await c.WriteAsync(1, 510, data)).IsOk, Is.True, "a write may span two extents");
        Assert.That((await c.FlushAsync(2, 1, 3)).IsOk, Is.True);
        byte[] back = new byte[data.Length];
        byte[] hashes = new byte[24];
        Assert.That((await c.ReadAsync(3, 510, back, hashes)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(data));
        Assert.That(BinaryPrimitives.ReadUInt64LittleEndian(hashes), Is.EqualTo(BlockContext.Hash(data.AsSpan(0, 4096))));
        Assert.That(_host.Region.GetExtentMeta(0), Is.EqualTo(new ExtentMeta(3, 1, false)));
        Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(new ExtentMeta(0, 0, false)), "untouched extent keeps its state");
    }

    [Test]
    public async Task Unwritten_blocks_read_as_zeroes_with_hash_zero()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello());
        byte[] back = new byte[4096];
        byte[] hashes = new byte[8];
        Assert.That((await c.ReadAsync(1, 100, back, hashes)).IsOk, Is.True);
        Assert.That((back.All(b => b == 0), BinaryPrimitives.ReadUInt64LittleEndian(hashes)), Is.EqualTo((true, 0UL)));
    }

    [Test]
    public async Task Write_whose_hash_does_not_match_is_refused_and_not_written()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello());
        byte[] data = TestData.Block(4096, 5, 1);
        DownstairsResult r = await c.WriteAsync(1, 5, data, new byte[8] { 1, 2, 3, 4, 5, 6, 7, 8 });
        Assert.That(r.Code, Is.EqualTo(ResultCode.HashMismatch));
        byte[] back = new byte[4096];
        await c.ReadAsync(2, 5, back);
        Assert.That(back, Is.All.EqualTo((byte)0));
    }

    [Test]
    public async Task Out_of_range_is_a_typed_error_and_the_link_stays_up()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello());
        DownstairsResult r = await c.WriteAsync(1, 2047, new byte[8192]);
        Assert.That(r.Code, Is.EqualTo(ResultCode.OutOfRange));
        Assert.That(await c.PingAsync(), Is.LessThan(TimeSpan.FromSeconds(5)));
    }

    [Test]
    public async Task Many_pipelined_jobs_complete_and_overlapping_writes_keep_their_order()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello());
        var tasks = new List<Task<DownstairsResult>>();
        for (int i = 0; i < 200; i++)
        {
            // Every 4th job rewrites block 7: the last one sent must win.
            long block = i % 4 == 0 ? 7 : i;
            tasks.Add(c.WriteAsync((ulong)i + 1, block, TestData.Block(4096, block, i)));
        }
        DownstairsResult[] results = await Task.WhenAll(tasks);
        Assert.That(results.Select(r => r.Code), Is.All.EqualTo(ResultCode.Ok));
        byte[] back = new byte[4096];
        await c.ReadAsync(1000, 7, back);
        Assert.That(back, Is.EqualTo(TestData.Block(4096, 7, 196)));
    }

    private static byte[] WriteBody(long block, byte[] data)
    {
        byte[] body = RawPeer.RangeBody((ulong)block, 1, Wire.HashSize + data.Length);
        BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(BlockRange.FixedSize), BlockContext.Hash(data));
        data.CopyTo(body.AsSpan(BlockRange.FixedSize + Wire.HashSize));
        return body;
    }

    [Test]
    public async Task Every_reply_of_a_batch_sent_in_one_packet_arrives_and_overlapping_jobs_keep_their_order()
    {
        (Stream s, _) = Pair();
        var peer = new RawPeer(s);
        Assert.That(await peer.HelloAsync(1, readOnly: false), Is.EqualTo(ResultCode.Ok));
        byte[] first = TestData.Block(4096, 5, 1);
        byte[] second = TestData.Block(4096, 5, 2);
        byte[] flush = new byte[FlushRequest.BodySize];
        BinaryPrimitives.WriteUInt64LittleEndian(flush, 1);
        BinaryPrimitives.WriteUInt64LittleEndian(flush.AsSpan(8), 1);
        // Jobs 1-3 and 5 touch block 5: 2 waits for 1, 3 for 2 (they leave the receive path for the IO
        // threads); 4 is a flush (a barrier, always on an IO thread); 6-25 are independent writes (extent 1).
        var batch = new List<byte[]>
        {
            RawPeer.Frame(MessageType.Write, 1, WriteBody(5, first)),
            RawPeer.Frame(MessageType.Write, 2, WriteBody(5, second)),
            RawPeer.Frame(MessageType.Read, 3, RawPeer.RangeBody(5, 1)),
            RawPeer.Frame(MessageType.Flush, 4, flush),
            RawPeer.Frame(MessageType.Read, 5, RawPeer.RangeBody(5, 1)),
        };
        for (int i = 0; i < 20; i++)
        {
            batch.Add(RawPeer.Frame(MessageType.Write, (ulong)(6 + i), WriteBody(600 + i, TestData.Block(4096, 600 + i, 1))));
        }
        await peer.SendAsync([.. batch.SelectMany(f => f)]);

        var replies = new Dictionary<ulong, (FrameHeader Header, byte[] Body)>();
        while (replies.Count < batch.Count)
        {
            (FrameHeader header, byte[] body) = await peer.ReceiveAsync() ?? throw new IOException("closed before every reply arrived");
            replies.Add(header.JobId, (header, body));
        }
        Assert.That(replies.Keys.Order(), Is.EqualTo(Enumerable.Range(1, batch.Count).Select(i => (ulong)i)));
        Assert.That(replies.Values.Select(r => r.Header.Result), Is.All.EqualTo(ResultCode.Ok));
        Assert.That(replies[3].Body.AsSpan(8 + Wire.HashSize).ToArray(), Is.EqualTo(second), "the read waited for both writes before it");
        Assert.That(replies[5].Body.AsSpan(8 + Wire.HashSize).ToArray(), Is.EqualTo(second));
        Assert.That(_host.Region.GetExtentMeta(0), Is.EqualTo(new ExtentMeta(1, 1, false)), "the flush ran after the writes before it");
    }

    [Test]
    public async Task Read_only_connection_cannot_write()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello(readOnly: true));
        Assert.That((await c.WriteAsync(1, 0, new byte[4096])).Code, Is.EqualTo(ResultCode.ReadOnly));
        Assert.That((await c.FlushAsync(2, 1, 1)).Code, Is.EqualTo(ResultCode.ReadOnly));
    }

    [Test]
    public async Task Wrong_region_and_wrong_version_are_refused()
    {
        (Stream s1, _) = Pair();
        Assert.That(async () => await DownstairsClient.ConnectAsync(s1, Hello() with { RegionId = Guid.NewGuid() }),
            Throws.TypeOf<DownstairsRefusedException>().With.Property(nameof(DownstairsRefusedException.Result)).Property(nameof(DownstairsResult.Code)).EqualTo(ResultCode.WrongRegion));
        (Stream s2, _) = Pair();
        Assert.That(async () => await DownstairsClient.ConnectAsync(s2, Hello() with { Version = 99 }),
            Throws.TypeOf<DownstairsRefusedException>().With.Property(nameof(DownstairsRefusedException.Result)).Property(nameof(DownstairsResult.Code)).EqualTo(ResultCode.VersionMismatch));
    }

    [Test]
    public async Task Malformed_frame_closes_only_that_connection_with_one_log_line()
    {
        (Stream bad, Task served) = Pair();
        await using DownstairsClient good = await DownstairsClient.ConnectAsync(Pair().Client, Hello(readOnly: true));
        await using (DownstairsClient c = await DownstairsClient.ConnectAsync(bad, Hello(readOnly: true)))
        {
            // A Write whose body is shorter than its block count says.
            byte[] frame = new byte[Wire.HeaderSize + BlockRange.FixedSize];
            FrameReader.WriteHeader(frame, MessageType.Write, ResultCode.Ok, 1, BlockRange.FixedSize);
            new BlockRange(0, 4).Write(frame.AsSpan(Wire.HeaderSize));
            await bad.WriteAsync(frame);
            await bad.FlushAsync();
            await served.WaitAsync(TimeSpan.FromSeconds(10));
            Assert.That(async () => await c.Completion.WaitAsync(TimeSpan.FromSeconds(10)), Throws.Nothing);
            Assert.That(c.Failure, Is.Not.Null);
        }
        Assert.That(_log.Lines.Count(l => l.Contains("invalid frame", StringComparison.Ordinal)), Is.EqualTo(1));
        Assert.That(await good.PingAsync(), Is.LessThan(TimeSpan.FromSeconds(5)), "other connections are untouched");
    }

    [Test]
    public async Task Client_that_stops_reading_makes_the_server_stop_taking_work()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello(), new DownstairsClientOptions());
        // Reads of 256 KiB: the 4 MiB budget admits ~16; the rest wait unread in the pipe.
        var reads = new List<Task<DownstairsResult>>();
        var buffers = new byte[64][];
        for (int i = 0; i < buffers.Length; i++)
        {
            buffers[i] = new byte[256 << 10];
            reads.Add(c.ReadAsync((ulong)i + 1, 0, buffers[i]));
        }
        DownstairsResult[] done = await Task.WhenAll(reads).WaitAsync(TimeSpan.FromSeconds(20));
        Assert.That(done.Select(d => d.Code), Is.All.EqualTo(ResultCode.Ok), "bounded, but never deadlocked");
    }

    [Test]
    public async Task Repair_ops_copy_an_extent_with_its_contexts()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello(2));
        await c.WriteAsync(1, 512 + 3, TestData.Block(4096, 3, 1));
        await c.FlushAsync(2, 5, 2);
        byte[] ctx = new byte[512 * 16];
        byte[] data = new byte[512 * 4096];
        ExtentReadResult read = await c.ReadExtentAsync(3, new ExtentRange(1, 0, 512), ctx, data);
        Assert.That(read.Result.IsOk, Is.True);
        Assert.That(read.Meta, Is.EqualTo(new ExtentMeta(2, 5, false)));
        Assert.That(data.AsSpan(3 * 4096, 4096).ToArray(), Is.EqualTo(TestData.Block(4096, 3, 1)));
        // Copy extent 1 over extent 2 (a stand-in for "from a healthy replica") in two chunks.
        Assert.That((await c.WriteExtentAsync(4, new ExtentRange(2, 0, 256, ExtentRange.BeginFlag), ctx.AsMemory(0, 256 * 16), data.AsMemory(0, 256 * 4096))).IsOk, Is.True);
        Assert.That((await c.WriteExtentAsync(5, new ExtentRange(2, 256, 256), ctx.AsMemory(256 * 16), data.AsMemory(256 * 4096))).IsOk, Is.True);
        Assert.That((await c.CommitExtentAsync(6, 2, new ExtentMeta(2, 5, false))).IsOk, Is.True);
        byte[] back = new byte[4096];
        byte[] hash = new byte[8];
        await c.ReadAsync(7, 1024 + 3, back, hash);
        Assert.That(back, Is.EqualTo(TestData.Block(4096, 3, 1)));
        Assert.That(BlockContext.Verify(back, BinaryPrimitives.ReadUInt64LittleEndian(hash)), Is.True);
        Assert.That(_host.Region.GetExtentMeta(2), Is.EqualTo(new ExtentMeta(2, 5, false)));
        Assert.That(Directory.GetFiles(Path.Combine(_dir.Sub("r"), "extents"), "*.repair"), Is.Empty);
    }

    [Test]
    public async Task Extents_marked_pending_repair_are_not_stamped_by_flushes_until_their_copy_is_committed()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello(2));
        Assert.That((await c.MarkRepairPendingAsync(1, [1, 3])).IsOk, Is.True);
        await c.WriteAsync(2, 0, TestData.Block(4096, 0, 1));        // extent 0: not pending
        await c.WriteAsync(3, 512 + 7, TestData.Block(4096, 7, 1));  // extent 1: pending, holds stale data
        Assert.That((await c.FlushAsync(4, 9, 2)).IsOk, Is.True);
        Assert.That(_host.Region.GetExtentMeta(0), Is.EqualTo(new ExtentMeta(2, 9, false)));
        Assert.That(_host.Region.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(0, 0, true)), "pending: left dirty, not stamped");

        byte[] ctx = new byte[512 * 16];
        byte[] data = new byte[512 * 4096];
        await c.WriteExtentAsync(5, new ExtentRange(1, 0, 512, ExtentRange.BeginFlag), ctx, data);
        Assert.That((await c.CommitExtentAsync(6, 1, new ExtentMeta(2, 9, false))).IsOk, Is.True);
        await c.WriteAsync(7, 512 + 8, TestData.Block(4096, 8, 1));
        Assert.That((await c.FlushAsync(8, 10, 2)).IsOk, Is.True);
        Assert.That(_host.Region.GetExtentMeta(1), Is.EqualTo(new ExtentMeta(2, 10, false)), "committed: stamped like any other extent");
        Assert.That(_host.Region.IsRepairPending(3), Is.True);

        (Stream s2, _) = Pair();
        await using DownstairsClient next = await DownstairsClient.ConnectAsync(s2, Hello(3));
        Assert.That(_host.Region.IsRepairPending(3), Is.False, "a new writer starts without the old writer's marks");
    }

    [Test]
    public async Task A_flush_a_closed_writer_left_queued_runs_before_the_next_writer_clears_the_repair_marks()
    {
        (Stream s, _) = Pair();
        DownstairsClient first = await DownstairsClient.ConnectAsync(s, Hello(2));
        Assert.That((await first.MarkRepairPendingAsync(1, [1])).IsOk, Is.True);
        await first.WriteAsync(2, 0, TestData.Block(4096, 0, 1));        // extent 0: not pending
        await first.WriteAsync(3, 512 + 7, TestData.Block(4096, 7, 1));  // extent 1: pending, holds stale data
        // A slow disk: the scheduler is busy, so the first writer's flush waits in the queue.
        using var disk = new ManualResetEventSlim();
        var busy = new BlockingJob(disk);
        _host.Scheduler.Submit(busy);
        Task<DownstairsResult> flush = first.FlushAsync(4, 9, 2);
        await WaitForAsync(() => _host.Scheduler.Active.Count >= 2, "the flush is queued behind the busy disk");
        await first.DisposeAsync();
        await WaitForAsync(() => _host.Writer is null, "the first writer's connection is gone");

        (Stream s2, _) = Pair();
        Task<DownstairsClient> connecting = DownstairsClient.ConnectAsync(s2, Hello(3));
        await Task.Delay(200);
        Assert.That(connecting.IsCompleted, Is.False, "the new writer is answered only after the jobs queued before it");
        disk.Set();
        await using DownstairsClient next = await connecting.WaitAsync(TimeSpan.FromSeconds(10));

        Assert.That(_host.Region.GetExtentMeta(0), Is.EqualTo(new ExtentMeta(2, 9, false)), "the queued flush ran");
        Assert.That(_host.Region.GetExtentMeta(1).Dirty, Is.True, "and left the extent still to be copied unstamped");
        Assert.That(_host.Region.IsRepairPending(1), Is.False, "the new writer starts without the old marks");
        Assert.That(next.Region.Extents[1].Dirty, Is.True, "its Hello reports the extent as the flush left it");
        _ = flush.ContinueWith(static _ => { }, TaskScheduler.Default);
    }

    private static async Task WaitForAsync(Func<bool> condition, string what)
    {
        for (int i = 0; i < 200 && !condition(); i++)
        {
            await Task.Delay(25);
        }
        Assert.That(condition(), Is.True, what);
    }

    /// <summary>A disk operation that takes until the test says so (a barrier: everything after it waits).</summary>
    private sealed class BlockingJob(ManualResetEventSlim release) : IoJob
    {
        public override long FirstBlock => 0;

        public override long EndBlock => long.MaxValue;

        public override JobAccess Access => JobAccess.Barrier;

        public override void Execute() => release.Wait(TimeSpan.FromSeconds(30));
    }

    [TestCase(2, new[] { 1 }, TestName = "ExtentsPending whose count disagrees with its body")]
    [TestCase(1, new[] { 4 }, TestName = "ExtentsPending naming an extent beyond the region")]
    public async Task Malformed_extents_pending_closes_the_connection_and_marks_nothing(int count, int[] extents)
    {
        (Stream s, Task served) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello());
        int bodySize = 4 + (4 * extents.Length);
        byte[] frame = new byte[Wire.HeaderSize + bodySize];
        FrameReader.WriteHeader(frame, MessageType.ExtentsPending, ResultCode.Ok, 1, bodySize);
        BinaryPrimitives.WriteInt32LittleEndian(frame.AsSpan(Wire.HeaderSize), count);
        for (int i = 0; i < extents.Length; i++)
        {
            BinaryPrimitives.WriteInt32LittleEndian(frame.AsSpan(Wire.HeaderSize + 4 + (4 * i)), extents[i]);
        }
        await s.WriteAsync(frame);
        await s.FlushAsync();
        await served.WaitAsync(TimeSpan.FromSeconds(10));
        Assert.That(Enumerable.Range(0, 4).Select(_host.Region.IsRepairPending), Has.All.False);
        Assert.That(_log.Lines, Has.Some.Contains("ExtentsPending"));
    }

    [Test]
    public async Task In_place_commit_records_the_copy_and_later_hellos_report_it()
    {
        (Stream s, _) = Pair();
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(s, Hello(3));
        // A catch-up as the engine runs it: mark, announce the flush number, write the changed blocks, commit.
        Assert.That((await c.MarkRepairPendingAsync(1, [1])).IsOk, Is.True);
        Assert.That((await c.FlushAsync(2, 5, 3)).IsOk, Is.True);
        byte[] data = TestData.Block(4096, 600, 2);
        Assert.That((await c.WriteAsync(3, 600, data)).IsOk, Is.True);
        DownstairsResult commit = await c.CommitExtentAsync(4, 1, new ExtentMeta(3, 5, false), inPlace: true);
        Assert.That(commit.IsOk, Is.True, commit.ToString());
        Assert.That(_host.Region.IsRepairPending(1), Is.False);
        byte[] back = new byte[4096];
        Assert.That((await c.ReadAsync(5, 600, back)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(data));

        (Stream s2, _) = Pair();
        await using DownstairsClient later = await DownstairsClient.ConnectAsync(s2, Hello(3, readOnly: true));
        Assert.That(later.Region.Extents[1], Is.EqualTo(new ExtentMeta(3, 5, false)));
    }

    [Test]
    public async Task Extent_commit_with_an_unknown_flag_bit_is_refused_and_changes_nothing()
    {
        (Stream s, _) = Pair();
        await using var peer = new RawPeer(s);
        Assert.That(await peer.HelloAsync(1, readOnly: false), Is.EqualTo(ResultCode.Ok));
        string before = DiskState.Of(_dir.Sub("r"));
        byte[] body = new byte[ExtentCommitRequest.BodySize];
        BinaryPrimitives.WriteInt32LittleEndian(body, 1);
        BinaryPrimitives.WriteUInt32LittleEndian(body.AsSpan(4), ExtentCommitRequest.InPlaceFlag | 4);
        await peer.SendAsync(MessageType.ExtentCommit, 1, body);
        (FrameHeader header, _) = await peer.ReceiveAsync() ?? throw new IOException("closed");
        Assert.That((header.Type, header.Result), Is.EqualTo((MessageType.ExtentCommitReply, ResultCode.Invalid)));
        Assert.That(DiskState.Of(_dir.Sub("r")), Is.EqualTo(before));
    }
}

internal sealed class ListLogger : ILogger
{
    private readonly System.Collections.Concurrent.ConcurrentQueue<string> _lines = new();

    public IReadOnlyCollection<string> Lines => _lines;

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter) =>
        _lines.Enqueue($"{logLevel} {eventId.Id} {formatter(state, exception)}");
}

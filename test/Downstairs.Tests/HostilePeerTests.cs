using NbdServer.Protocol;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// Attacks on a real downstairs process, each written as the attacker would send it: the process
/// survives, the honest upstairs keeps being served, and nothing on disk changes.
/// </summary>
[CancelAfter(60_000)]
public sealed class HostilePeerTests
{
    private TempDir _dir = null!;

    [SetUp]
    public void SetUp() => _dir = new TempDir();

    [TearDown]
    public void TearDown() => _dir.Dispose();

    private async Task<string> CreateAsync()
    {
        string d = _dir.Sub("r");
        var r = await DownstairsProcess.RunToolAsync("create", "--data", d, "--size", "8MiB", "--block-size", "4096", "--extent-size", "512");
        Assert.That(r.ExitCode, Is.EqualTo(0), r.Stderr);
        return d;
    }

    /// <summary>An honest upstairs that wrote and flushed one block; returns the block.</summary>
    private static async Task<byte[]> WriteAndFlushAsync(DownstairsClient honest, ulong generation)
    {
        byte[] data = TestData.Block(4096, 700, 1);
        Assert.That((await honest.WriteAsync(1, 700, data)).IsOk, Is.True);
        Assert.That((await honest.FlushAsync(2, 1, generation)).IsOk, Is.True);
        return data;
    }

    private static async Task<bool> ExitedSoonAsync(DownstairsProcess ds)
    {
        for (int i = 0; i < 50 && !ds.HasExited; i++)
        {
            await Task.Delay(100);
        }
        return ds.HasExited;
    }

    private static async Task AssertStillServedAsync(DownstairsProcess ds, DownstairsClient honest, byte[] block)
    {
        Assert.That(ds.HasExited, Is.False, "the downstairs process survived");
        Assert.That(await honest.PingAsync(), Is.LessThan(TimeSpan.FromSeconds(10)));
        byte[] back = new byte[4096];
        Assert.That((await honest.ReadAsync(100, 700, back)).IsOk, Is.True);
        Assert.That(back, Is.EqualTo(block));
    }

    [Test]
    public async Task Read_and_write_with_first_block_near_2_pow_63_are_refused_and_the_process_survives()
    {
        string d = await CreateAsync();
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d);
        await using DownstairsClient honest = await ds.ConnectAsync(generation: 1);
        byte[] block = await WriteAndFlushAsync(honest, 1);
        string before = DiskState.Of(d);

        // first + count overflows a long: a check written as "first + count > blocks" passes.
        const ulong nearTop = long.MaxValue - 1;
        await using RawPeer attacker = await RawPeer.ConnectAsync(ds.Endpoint);
        Assert.That(await attacker.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Ok));
        await attacker.SendAsync(MessageType.Read, 1, RawPeer.RangeBody(nearTop, 4));
        await attacker.SendAsync(MessageType.Read, 2, RawPeer.RangeBody(nearTop, 4));
        await attacker.SendAsync(MessageType.Write, 3, RawPeer.RangeBody(nearTop, 4, 4 * (8 + 4096)));
        var codes = new List<ResultCode>();
        for (int i = 0; i < 3; i++)
        {
            (FrameHeader header, _) = await attacker.ReceiveAsync() ?? throw new AssertionException($"connection closed after {i} replies; process exited: {await ExitedSoonAsync(ds)}\n{string.Join("\n", ds.Lines.TakeLast(15))}");
            codes.Add(header.Result);
        }
        Assert.That(codes, Is.All.EqualTo(ResultCode.OutOfRange));

        await AssertStillServedAsync(ds, honest, block);
        Assert.That(DiskState.Of(d), Is.EqualTo(before), "nothing on disk changed");
    }

    [Test]
    public async Task Large_frames_from_many_peers_stay_within_max_memory_and_the_writer_is_served()
    {
        string d = await CreateAsync();
        await using DownstairsProcess ds = await DownstairsProcess.StartAsync(d, ["--max-memory", "256MiB"]);
        await using DownstairsClient writer = await ds.ConnectAsync(generation: 1);
        byte[] block = await WriteAndFlushAsync(writer, 1);
        long baseline = ds.RssBytes();

        // 15 peers each start a 33 MiB Write and send all of it but the last byte.
        const int frameBody = (32 << 20) + (1 << 20);
        byte[] frame = new byte[Wire.HeaderSize + frameBody - 1];
        FrameReader.WriteHeader(frame, MessageType.Write, ResultCode.Ok, 1, frameBody);
        using var stop = new CancellationTokenSource();
        var peers = new List<RawPeer>();
        var sends = new List<Task>();
        try
        {
            for (int i = 0; i < 15; i++)
            {
                RawPeer p = await RawPeer.ConnectAsync(ds.Endpoint);
                peers.Add(p);
                Assert.That(await p.HelloAsync(0, readOnly: true), Is.EqualTo(ResultCode.Ok));
                sends.Add(p.Stream.WriteAsync(frame, stop.Token).AsTask());
            }
            long peak = 0;
            for (int i = 0; i < 30; i++)
            {
                await Task.Delay(200);
                peak = Math.Max(peak, ds.RssBytes() - baseline);
            }
            // 256 MiB less the writer's reserve (64 + 33 MiB) is all the others may buffer; without
            // the cap the process takes 15 × 33 MiB ≈ 500 MiB.
            Assert.That(peak, Is.LessThan(250L << 20), $"RSS grew by {peak >> 20} MiB");
            await AssertStillServedAsync(ds, writer, block);
            byte[] big = new byte[1 << 20];
            Random.Shared.NextBytes(big);
            Assert.That((await writer.WriteAsync(10, 1024, big)).IsOk, Is.True, "the writer's own large writes still pass");
        }
        finally
        {
            await stop.CancelAsync();
            foreach (RawPeer p in peers)
            {
                await p.DisposeAsync();
            }
            await Task.WhenAll(sends).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        }
    }
}

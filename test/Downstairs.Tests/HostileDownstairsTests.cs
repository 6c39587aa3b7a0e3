using System.Buffers.Binary;
using Nerdbank.Streams;
using NbdServer.Protocol;
using NbdServer.Downstairs.Storage;

namespace NbdServer.Downstairs.Tests;

/// <summary>The upstairs side: a downstairs that answers Hello with nonsense is refused with a clear error, never trusted.</summary>
[CancelAfter(10_000)]
public sealed class HostileDownstairsTests
{
    /// <summary>Plays a downstairs that answers the Hello with <paramref name="reply"/>; returns what ConnectAsync did.</summary>
    private static async Task<Exception?> ConnectToAsync(HelloReply reply)
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        await using var peer = new RawPeer(server);
        Task<DownstairsClient> connecting = DownstairsClient.ConnectAsync(client, new HelloRequest(Wire.ProtocolVersion, true, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 0));
        Assert.That(await peer.ReceiveAsync(), Is.Not.Null, "the Hello arrived");
        OutgoingFrame frame = reply.Encode();
        await peer.SendAsync([.. frame.Prefix.AsSpan(0, frame.PrefixLength)]);
        frame.ReturnPrefix();
        DownstairsClient c;
        try
        {
            c = await connecting.WaitAsync(TimeSpan.FromSeconds(5));
        }
        catch (Exception e)
        {
            return e;
        }
        // End the link from the downstairs' side first: the client's receive loop then stops by itself.
        await peer.DisposeAsync();
        await c.DisposeAsync();
        return null;
    }

    [TestCase(Wire.MaxGeneration - 1, 5UL, "generation")]
    [TestCase(8UL, 5UL, "generation")]
    [TestCase(3UL, Wire.MaxFlushNumber, "flush number")]
    public async Task Extent_read_reply_with_impossible_metadata_fails_the_job_and_is_never_handed_to_the_engine(ulong generation, ulong flush, string names)
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        await using var peer = new RawPeer(server);
        // A writer at generation 7: no extent it reads can carry a newer generation.
        Task<DownstairsClient> connecting = DownstairsClient.ConnectAsync(client, new HelloRequest(Wire.ProtocolVersion, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 7));
        Assert.That(await peer.ReceiveAsync(), Is.Not.Null, "the Hello arrived");
        OutgoingFrame hello = (Sane() with { ReadOnly = false, HighestGeneration = 7 }).Encode();
        await peer.SendAsync([.. hello.Prefix.AsSpan(0, hello.PrefixLength)]);
        hello.ReturnPrefix();
        DownstairsClient c = await connecting.WaitAsync(TimeSpan.FromSeconds(5));
        try
        {
            await ReadLyingExtentAsync(c, peer, generation, flush, names);
        }
        finally
        {
            // End the link from the downstairs' side first: the client's receive loop then stops by itself.
            await peer.DisposeAsync();
            await c.DisposeAsync();
        }
    }

    private static async Task ReadLyingExtentAsync(DownstairsClient c, RawPeer peer, ulong generation, ulong flush, string names)
    {
        byte[] contexts = new byte[BlockContext.Size];
        byte[] data = new byte[4096];
        Task<ExtentReadResult> reading = c.ReadExtentAsync(1, new ExtentRange(0, 0, 1), contexts, data);
        Assert.That(await peer.ReceiveAsync(), Is.Not.Null, "the ExtentRead arrived");
        byte[] body = new byte[24 + BlockContext.Size + 4096];
        BinaryPrimitives.WriteUInt64LittleEndian(body, generation);
        BinaryPrimitives.WriteUInt64LittleEndian(body.AsSpan(8), flush);
        BinaryPrimitives.WriteInt32LittleEndian(body.AsSpan(20), 1);
        await peer.SendAsync(RawPeer.Frame(MessageType.ExtentReadReply, 1, body));

        Assert.That(async () => await reading.WaitAsync(TimeSpan.FromSeconds(5)),
            Throws.TypeOf<DownstairsConnectionException>().With.Message.Contains("misbehaving").And.Message.Contains(names));
    }

    private static HelloReply Sane(int extentCount = 4) =>
        new(Wire.ProtocolVersion, true, Guid.NewGuid(), 4096, 512, extentCount, Wire.DefaultMaxFrameBytes, 1024, 3, new ExtentMeta[extentCount]);

    [Test]
    public async Task A_sane_Hello_reply_is_accepted()
    {
        Assert.That(await ConnectToAsync(Sane()), Is.Null);
    }

    private static HelloReply Nonsense(string what) => what switch
    {
        "block size 1000" => Sane() with { BlockSize = 1000 },
        "block size 0" => Sane() with { BlockSize = 0 },
        "0 blocks per extent" => Sane() with { ExtentBlocks = 0 },
        "2^31-1 blocks per extent" => Sane() with { ExtentBlocks = int.MaxValue },
        "no extents" => Sane(0),
        "max frame 100" => Sane() with { MaxFrameBytes = 100 },
        "max frame 2 GiB" => Sane() with { MaxFrameBytes = int.MaxValue },
        "0 jobs" => Sane() with { MaxJobs = 0 },
        _ => throw new ArgumentException(what),
    };

    [TestCase("block size 1000", "block size")]
    [TestCase("block size 0", "block size")]
    [TestCase("0 blocks per extent", "blocks per extent")]
    [TestCase("2^31-1 blocks per extent", "blocks per extent")]
    [TestCase("no extents", "extents")]
    [TestCase("max frame 100", "max frame")]
    [TestCase("max frame 2 GiB", "max frame")]
    [TestCase("0 jobs", "jobs")]
    public async Task Hello_reply_with_impossible_geometry_is_refused_with_a_clear_error(string what, string names)
    {
        Exception? e = await ConnectToAsync(Nonsense(what));
        Assert.That(e, Is.TypeOf<DownstairsProtocolException>().With.Message.Contains("misbehaving").And.Message.Contains(names));
    }
}

using System.Buffers.Binary;
using System.Diagnostics;
using System.IO.Pipelines;
using Nerdbank.Streams;
using NbdServer.Protocol;
using NbdServer.Testing;

namespace NbdServer.Downstairs.Tests;

/// <summary>
/// A real <see cref="DownstairsClient"/> against a lying downstairs (<see cref="MaliciousDownstairs"/>):
/// every call ends, with a result or a <see cref="DownstairsConnectionException"/>; the receive loop
/// ends without an unexpected exception; nothing is allocated by a length the peer announced.
/// </summary>
[TestFixture]
[Category("Fuzz")]
[CancelAfter(Fuzz.MaxSeconds * 1000 + 120_000)]
public sealed class ClientFuzzTests
{
    private const int BlockSize = 4096;
    private const int ExtentBlocks = 8;
    private const int ExtentCount = 4;
    private const int MaxFrameBytes = 1 << 20;
    private static readonly TimeSpan Patience = TimeSpan.FromSeconds(10);
    private static readonly TimeSpan HelloPatience = TimeSpan.FromMilliseconds(150);

    /// <summary>Allocation allowed per fuzz connection: frames are at most 1 MiB; a peer's 2^31-extent claim would be 48 GiB.</summary>
    private const long AllocationBound = 64L << 20;

    private static readonly HelloReply Honest = new(Wire.ProtocolVersion, false, Guid.NewGuid(), BlockSize, ExtentBlocks, ExtentCount,
        MaxFrameBytes, 64, 3, [.. Enumerable.Repeat(new ExtentMeta(1, 1, false), ExtentCount)]);

    [Test]
    public Task A_lying_downstairs_fails_the_client_cleanly() => FuzzAsync(MaliciousDownstairs.HelloMode.Lying, Fuzz.Budget(5));

    [Test]
    public Task A_downstairs_lying_about_geometry_fails_the_client_cleanly() => FuzzAsync(MaliciousDownstairs.HelloMode.AnyGeometry, Fuzz.Budget(5));

    [Test]
    public async Task A_hello_reply_announcing_2_31_extents_in_a_small_body_is_refused_before_allocating()
    {
        OutgoingFrame frame = Honest.Encode();
        byte[] bytes = frame.Prefix.AsSpan(0, frame.PrefixLength).ToArray();
        frame.ReturnPrefix();
        BinaryPrimitives.WriteInt32LittleEndian(bytes.AsSpan(Wire.HeaderSize + 32), int.MaxValue);
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        Task serving = AnswerHelloAsync(server, bytes);

        long allocated = GC.GetTotalAllocatedBytes(precise: true);
        Assert.That(async () => await DownstairsClient.ConnectAsync(client, Hello(), new DownstairsClientOptions { MaxFrameBytes = MaxFrameBytes }),
            Throws.InstanceOf<DownstairsProtocolException>().With.Message.Contains("extents"));
        Assert.That(GC.GetTotalAllocatedBytes(precise: true) - allocated, Is.LessThan(AllocationBound));
        await serving;
    }

    [TestCase("unknown job")]
    [TestCase("wrong type")]
    [TestCase("read reply too short")]
    [TestCase("read reply with more blocks")]
    [TestCase("error body too long")]
    [TestCase("body beyond the maximum frame")]
    public async Task A_bad_reply_fails_the_pending_job_and_the_connection(string lie)
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        var lied = new TaskCompletionSource();
        Task serving = Task.Run(async () =>
        {
            var reader = PipeReader.Create(server);
            await ReadOneFrameAsync(reader);
            await server.WriteAsync(MaliciousDownstairsEncode(Honest));
            FrameHeader read = await ReadOneFrameAsync(reader);
            byte[] reply = lie switch
            {
                "unknown job" => FrameFuzzer.Frame(MessageType.ReadReply, ResultCode.Ok, read.JobId + 1000, ReadBody(1)),
                "wrong type" => FrameFuzzer.Frame(MessageType.WriteReply, ResultCode.Ok, read.JobId, []),
                "read reply too short" => FrameFuzzer.Frame(MessageType.ReadReply, ResultCode.Ok, read.JobId, ReadBody(1)[..100]),
                "read reply with more blocks" => FrameFuzzer.Frame(MessageType.ReadReply, ResultCode.Ok, read.JobId, ReadBody(2)),
                "error body too long" => FrameFuzzer.Frame(MessageType.ReadReply, ResultCode.IoError, read.JobId, new byte[4 + Wire.MaxErrorMessageBytes + 1]),
                _ => HeaderOnly(MessageType.ReadReply, read.JobId, MaxFrameBytes + 1),
            };
            await server.WriteAsync(reply);
            lied.SetResult();
            await Fuzz.DrainAsync(server, CancellationToken.None);
        });
        await using DownstairsClient c = await DownstairsClient.ConnectAsync(client, Hello(), new DownstairsClientOptions { MaxFrameBytes = MaxFrameBytes });

        Task<DownstairsResult> job = c.ReadAsync(7, 0, new byte[BlockSize]);

        Assert.That(async () => await job.WaitAsync(Patience), Throws.InstanceOf<DownstairsConnectionException>());
        Assert.That(await Task.WhenAny(c.Completion, Task.Delay(Patience)), Is.SameAs(c.Completion), "the receive loop did not end");
        Assert.That(c.Completion.IsFaulted, Is.False, c.Completion.Exception?.ToString());
        Assert.That(c.Failure, Is.InstanceOf<DownstairsConnectionException>());
        Assert.That(() => c.ReadAsync(8, 0, new byte[BlockSize]), Throws.InstanceOf<DownstairsConnectionException>(), "a failed link takes no more jobs");
        await client.DisposeAsync();
        await serving.WaitAsync(Patience);
        Assert.That(lied.Task.IsCompleted, Is.True);
    }

    [TestCase(false)]
    [TestCase(true)]
    public async Task A_job_waiting_for_a_send_slot_fails_cleanly_when_the_link_ends(bool peerHangsUp)
    {
        // The peer allows one job in flight and never answers it: the second job waits for a slot.
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        Task serving = AnswerHelloAsync(server, MaliciousDownstairsEncode(Honest with { MaxJobs = 1 }), hangUp: peerHangsUp);
        DownstairsClient c = await DownstairsClient.ConnectAsync(client, Hello(), new DownstairsClientOptions { MaxFrameBytes = MaxFrameBytes });
        Task<DownstairsResult> first = c.ReadAsync(1, 0, new byte[BlockSize]);
        Task<DownstairsResult> waiting = c.ReadAsync(2, 1, new byte[BlockSize]);
        await Task.Delay(50);
        Assert.That(waiting.IsCompleted, Is.False, "setup: the second job waits for the only slot");

        if (!peerHangsUp)
        {
            await c.DisposeAsync();
        }

        Assert.That(async () => await waiting.WaitAsync(Patience), Throws.InstanceOf<DownstairsConnectionException>());
        Assert.That(async () => await first.WaitAsync(Patience), Throws.InstanceOf<DownstairsConnectionException>());
        await c.DisposeAsync();
        await client.DisposeAsync();
        await serving.WaitAsync(Patience);
    }

    private static byte[] ReadBody(int blocks)
    {
        byte[] body = new byte[8 + (blocks * (Wire.HashSize + BlockSize))];
        BinaryPrimitives.WriteInt32LittleEndian(body, blocks);
        return body;
    }

    private static byte[] HeaderOnly(MessageType type, ulong job, int length)
    {
        byte[] frame = FrameFuzzer.Frame(type, ResultCode.Ok, job, []);
        BinaryPrimitives.WriteInt32LittleEndian(frame.AsSpan(Wire.LengthOffset), length);
        return frame;
    }

    private static byte[] MaliciousDownstairsEncode(HelloReply reply)
    {
        OutgoingFrame frame = reply.Encode();
        byte[] bytes = frame.Prefix.AsSpan(0, frame.PrefixLength).ToArray();
        frame.ReturnPrefix();
        return bytes;
    }

    private static async Task<FrameHeader> ReadOneFrameAsync(PipeReader reader)
    {
        while (true)
        {
            ReadResult result = await reader.ReadAsync();
            System.Buffers.ReadOnlySequence<byte> buffer = result.Buffer;
            if (FrameReader.TryRead(ref buffer, 64 << 20, out FrameHeader header, out _))
            {
                reader.AdvanceTo(buffer.Start);
                return header;
            }
            reader.AdvanceTo(buffer.Start, buffer.End);
            if (result.IsCompleted)
            {
                throw new IOException("client closed");
            }
        }
    }

    private static async Task AnswerHelloAsync(Stream server, byte[] reply, bool hangUp = false)
    {
        var reader = PipeReader.Create(server);
        await ReadOneFrameAsync(reader);
        await server.WriteAsync(reply);
        if (hangUp)
        {
            // Wait for the first request (never answered), then close.
            await ReadOneFrameAsync(reader);
            await Task.Delay(100);
            await server.DisposeAsync();
            return;
        }
        // Until the client hangs up; then close our side too (an in-process pipe, unlike a socket,
        // keeps the client's pending read open until the other side closes).
        await Fuzz.DrainAsync(server, CancellationToken.None);
        await server.DisposeAsync();
    }

    private static HelloRequest Hello() => new(Wire.ProtocolVersion, false, Guid.Empty, Guid.NewGuid(), Guid.NewGuid(), 4);

    private static async Task FuzzAsync(MaliciousDownstairs.HelloMode mode, TimeSpan budget)
    {
        int seed = Fuzz.Seed();
        var clock = Stopwatch.StartNew();
        int iteration = 0;
        int connected = 0;
        for (; iteration < Fuzz.MaxIterations && clock.Elapsed < budget; iteration++)
        {
            var rng = new Random(seed + iteration);
            string replay = Fuzz.Replay(seed, iteration);
            long allocatedBefore = GC.GetTotalAllocatedBytes();
            (Stream client, Stream server) = FullDuplexStream.CreatePair(new PipeOptions(pauseWriterThreshold: 4 << 20, resumeWriterThreshold: 2 << 20));
            using var cancel = new CancellationTokenSource(Patience);
            Task lying = Task.Run(() => MaliciousDownstairs.RunAsync(server, rng, Honest, mode, cancel.Token));

            DownstairsClient? c = null;
            // A Hello reply that never completes is the connect timeout's business (ConnectTimeout over TCP).
            using var helloTimeout = CancellationTokenSource.CreateLinkedTokenSource(cancel.Token);
            helloTimeout.CancelAfter(HelloPatience);
            try
            {
                c = await DownstairsClient.ConnectAsync(client, Hello(), new DownstairsClientOptions { MaxFrameBytes = MaxFrameBytes }, helloTimeout.Token);
            }
            catch (Exception e) when (e is DownstairsProtocolException or DownstairsRefusedException or DownstairsConnectionException
                || (e is OperationCanceledException && helloTimeout.IsCancellationRequested))
            {
                // Refusing a bad Hello reply, or giving up on one that never completes, is the right answer.
            }
            if (c is not null)
            {
                connected++;
                List<Task> jobs = StartJobs(c, new Random(seed + iteration + 1));
                // Give the liar a moment to answer, then give up on it as the engine would.
                await Task.WhenAny(Task.WhenAll(jobs), Task.Delay(rng.Next(0, 50), CancellationToken.None));
                await c.DisposeAsync();
                await Task.WhenAny(Task.WhenAll(jobs), Task.Delay(Patience, CancellationToken.None));
                foreach (Task job in jobs)
                {
                    Assert.That(job.IsCompleted, Is.True, $"a job never ended; {replay}");
                    Assert.That(job.Exception?.InnerException, Is.Null.Or.InstanceOf<DownstairsConnectionException>(), $"a job failed with an unexpected exception; {replay}");
                }
                Assert.That(c.Completion.IsCompleted, Is.True, $"the receive loop outlived dispose; {replay}");
                Assert.That(c.Completion.Exception, Is.Null, $"the receive loop died of an unexpected exception; {replay}");
            }
            await client.DisposeAsync();
            await lying.WaitAsync(Patience);
            Assert.That(GC.GetTotalAllocatedBytes() - allocatedBefore, Is.LessThan(AllocationBound), $"allocated beyond any frame; {replay}");
        }
        TestContext.Out.WriteLine($"{iteration} lying downstairs sessions ({connected} got past Hello) in {clock.Elapsed.TotalSeconds:0.0} s");
        Assert.That(connected, Is.GreaterThan(0), "no session got past Hello: the fuzz exercised nothing after it");
    }

    /// <summary>A handful of pipelined jobs of every kind, the way the engine issues them.</summary>
    private static List<Task> StartJobs(DownstairsClient c, Random rng)
    {
        var jobs = new List<Task>();
        ulong id = 1;
        int count = rng.Next(1, 8);
        for (int i = 0; i < count; i++)
        {
            try
            {
                jobs.Add(rng.Next(7) switch
                {
                    0 => c.WriteAsync(id++, rng.Next(0, 30), new byte[BlockSize * rng.Next(1, 3)]),
                    1 => c.ReadAsync(id++, rng.Next(0, 30), new byte[BlockSize * rng.Next(1, 3)], default),
                    2 => c.FlushAsync(id++, 2, 4),
                    3 => c.PingAsync(),
                    4 => c.ReadExtentAsync(id++, new ExtentRange(rng.Next(0, ExtentCount), 0, 2), new byte[2 * 16], new byte[2 * BlockSize]),
                    5 => c.WriteExtentAsync(id++, new ExtentRange(rng.Next(0, ExtentCount), 0, 1, ExtentRange.BeginFlag), new byte[16], new byte[BlockSize]),
                    _ => c.CommitExtentAsync(id++, rng.Next(0, ExtentCount), new ExtentMeta(4, 2, false)),
                });
            }
            catch (DownstairsConnectionException)
            {
                // The link already failed: a clean refusal of further jobs.
            }
            catch (ArgumentException)
            {
                // Our buffer doesn't fit the block size the peer announced (AnyGeometry): refused before
                // sending. The engine compares geometry with the volume's before any IO.
            }
        }
        return jobs;
    }
}

using Microsoft.Extensions.Time.Testing;
using NbdServer.Common.Volumes;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>The engine's hot path allocates nothing per IO once warm: jobs, completions and async state are pooled.</summary>
[CancelAfter(60_000)]
public sealed class AllocationTests
{
    private const int Warmup = 2_000;
    private const int Measured = 20_000;

    /// <summary>Under one byte per IO: any per-IO object (a job, a task, a closure) costs at least 24.</summary>
    private const double AllowedBytesPerIo = 1;

    [Test]
    public async Task Steady_state_4k_writes_and_reads_allocate_nothing_per_IO()
    {
        var connector = new InlineConnector();
        // A clock that never moves: no tick can run the loop on a timer thread mid-measurement.
        await using ReplicatedVolume volume = await ReplicatedVolume.StartAsync(Cluster.Options(), new ListLogger(), connector, CancellationToken.None, time: new FakeTimeProvider());
        byte[] block = new byte[4096];
        Random.Shared.NextBytes(block);

        for (int i = 0; i < Warmup; i++)
        {
            await volume.WriteAsync((i % 64) * 4096L, block, WriteOptions.None, CancellationToken.None);
            await volume.ReadAsync((i % 64) * 4096L, block, CancellationToken.None);
        }
        long before = GC.GetAllocatedBytesForCurrentThread();
        for (int i = 0; i < Measured; i++)
        {
            await volume.WriteAsync((i % 64) * 4096L, block, WriteOptions.None, CancellationToken.None);
            await volume.ReadAsync((i % 64) * 4096L, block, CancellationToken.None);
        }
        long allocated = GC.GetAllocatedBytesForCurrentThread() - before;
        double perIo = allocated / (2.0 * Measured);
        TestContext.Out.WriteLine($"{allocated:N0} bytes over {2 * Measured:N0} IOs: {perIo:0.00} bytes per IO");
        Assert.That(perIo, Is.LessThan(AllowedBytesPerIo));
    }

    // The replicas answer inside the call, so every step of an IO runs on the test's thread and the
    // thread's own allocation counter sees all of it (and nothing of the test runner's threads).

    /// <summary>Replicas that answer inside the call, from one shared in-memory region: only the engine's own cost remains.</summary>
    private sealed class InlineConnector : IDownstairsConnector
    {
        private readonly byte[][] _blocks = [new byte[64 * 4096], new byte[64 * 4096], new byte[64 * 4096]];
        private readonly byte[][] _hashes = [new byte[64 * 8], new byte[64 * 8], new byte[64 * 8]];

        public Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, IDownstairsReplyHandler replies, CancellationToken cancellationToken) =>
            Task.FromResult<IDownstairs>(new Connection(replies, _blocks[replica], _hashes[replica],
                new HelloReply(Wire.ProtocolVersion, hello.ReadOnly, Guid.Empty, 4096, 64, 1, Wire.DefaultMaxFrameBytes, 1024, hello.Generation, [default])));

        private sealed class Connection(IDownstairsReplyHandler replies, byte[] blocks, byte[] hashes, HelloReply region) : IDownstairs
        {
            public HelloReply Region => region;

            public void SubmitWrite(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> blockHashes)
            {
                data.Span.CopyTo(blocks.AsSpan((int)(firstBlock * 4096)));
                blockHashes.Span.CopyTo(hashes.AsSpan((int)(firstBlock * 8)));
                replies.OnReply(jobId, DownstairsResult.Ok, default);
            }

            public void SubmitRead(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> blockHashes)
            {
                blocks.AsSpan((int)(firstBlock * 4096), data.Length).CopyTo(data.Span);
                hashes.AsSpan((int)(firstBlock * 8), blockHashes.Length).CopyTo(blockHashes.Span);
                replies.OnReply(jobId, DownstairsResult.Ok, default);
            }

            public void SubmitFlush(ulong jobId, ulong flushNumber, ulong generation) => replies.OnReply(jobId, DownstairsResult.Ok, default);

            public void SubmitReadExtent(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data) => replies.OnReply(jobId, DownstairsResult.Ok, default);

            public void SubmitWriteExtent(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data) => replies.OnReply(jobId, DownstairsResult.Ok, default);

            public void SubmitCommitExtent(ulong jobId, int extent, ExtentMeta meta) => replies.OnReply(jobId, DownstairsResult.Ok, default);

            public void SubmitMarkRepairPending(ulong jobId, IReadOnlyList<int> extents) => replies.OnReply(jobId, DownstairsResult.Ok, default);

            public void BeginBatch()
            {
            }

            public void EndBatch()
            {
            }

            public ValueTask DisposeAsync() => ValueTask.CompletedTask;
        }
    }
}

using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// Three replicas that answer inside the call, each from its own in-memory region: what is left
/// is the engine's own cost (the allocation test and the engine benchmark run against it).
/// </summary>
internal sealed class InlineDownstairs(int blockSize, int blocks) : IDownstairsConnector
{
    private readonly byte[][] _data = [new byte[blockSize * blocks], new byte[blockSize * blocks], new byte[blockSize * blocks]];
    private readonly byte[][] _hashes = [new byte[blocks * Wire.HashSize], new byte[blocks * Wire.HashSize], new byte[blocks * Wire.HashSize]];

    public Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, IDownstairsReplyHandler replies, CancellationToken cancellationToken) =>
        Task.FromResult<IDownstairs>(new Connection(replies, _data[replica], _hashes[replica], blockSize,
            new HelloReply(Wire.ProtocolVersion, hello.ReadOnly, Guid.Empty, blockSize, blocks, 1, Wire.DefaultMaxFrameBytes, 1024, hello.Generation, [default])));

    private sealed class Connection(IDownstairsReplyHandler replies, byte[] data, byte[] hashes, int blockSize, HelloReply region) : IDownstairs
    {
        public HelloReply Region => region;

        public void SubmitWrite(ulong jobId, long firstBlock, ReadOnlyMemory<byte> source, ReadOnlyMemory<byte> blockHashes)
        {
            source.Span.CopyTo(data.AsSpan((int)(firstBlock * blockSize)));
            blockHashes.Span.CopyTo(hashes.AsSpan((int)(firstBlock * Wire.HashSize)));
            replies.OnReply(jobId, DownstairsResult.Ok, default);
        }

        public void SubmitRead(ulong jobId, long firstBlock, Memory<byte> destination, Memory<byte> blockHashes)
        {
            data.AsSpan((int)(firstBlock * blockSize), destination.Length).CopyTo(destination.Span);
            hashes.AsSpan((int)(firstBlock * Wire.HashSize), blockHashes.Length).CopyTo(blockHashes.Span);
            replies.OnReply(jobId, DownstairsResult.Ok, default);
        }

        public void SubmitFlush(ulong jobId, ulong flushNumber, ulong generation) => replies.OnReply(jobId, DownstairsResult.Ok, default);

        public void SubmitReadExtent(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> destination) => replies.OnReply(jobId, DownstairsResult.Ok, default);

        public void SubmitWriteExtent(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> source) => replies.OnReply(jobId, DownstairsResult.Ok, default);

        public void SubmitCommitExtent(ulong jobId, int extent, ExtentMeta meta, bool inPlace) => replies.OnReply(jobId, DownstairsResult.Ok, default);

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

using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The operations the engine needs from one downstairs connection. <see cref="DownstairsClient"/>
/// implements them over TCP; engine tests script them in-process. Each Submit queues its request
/// before returning and never waits (calls made in order are sent in order; the engine keeps its
/// own outstanding work below the downstairs' job limit). Every submitted job gets exactly one
/// <see cref="IDownstairsReplyHandler.OnReply"/>, from the downstairs or, when the link ends, a
/// failure (<see cref="DownstairsResult.IsLinkFailure"/>); after it the connection never touches
/// that job's memory again.
/// </summary>
internal interface IDownstairs : IAsyncDisposable
{
    HelloReply Region { get; }

    void SubmitWrite(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes);

    void SubmitRead(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes);

    void SubmitFlush(ulong jobId, ulong flushNumber, ulong generation);

    void SubmitReadExtent(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data);

    void SubmitWriteExtent(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data);

    void SubmitCommitExtent(ulong jobId, int extent, ExtentMeta meta, bool inPlace);

    void SubmitMarkRepairPending(ulong jobId, IReadOnlyList<int> extents);

    /// <summary>Holds what is submitted from now on until <see cref="EndBatch"/>: the sender is woken once per batch, not per request.</summary>
    void BeginBatch();

    /// <summary>Everything submitted since <see cref="BeginBatch"/> goes out now, in submission order.</summary>
    void EndBatch();
}

/// <summary>Opens a connection to one replica (TCP in production, scripted in tests); its replies go to <paramref name="replies"/>.</summary>
internal interface IDownstairsConnector
{
    Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, IDownstairsReplyHandler replies, CancellationToken cancellationToken);
}

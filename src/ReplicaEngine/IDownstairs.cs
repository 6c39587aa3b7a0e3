using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// The operations the engine needs from one downstairs connection. <see cref="DownstairsClient"/>
/// implements it over TCP; engine tests script it in-process. Each call enqueues its request
/// before returning (so calls made in order are sent in order) and completes with the reply.
/// </summary>
internal interface IDownstairs : IAsyncDisposable
{
    HelloReply Region { get; }

    Task<DownstairsResult> WriteAsync(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes, CancellationToken cancellationToken = default);

    Task<DownstairsResult> ReadAsync(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes, CancellationToken cancellationToken = default);

    Task<DownstairsResult> FlushAsync(ulong jobId, ulong flushNumber, ulong generation, CancellationToken cancellationToken = default);

    Task<ExtentReadResult> ReadExtentAsync(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data, CancellationToken cancellationToken = default);

    Task<DownstairsResult> WriteExtentAsync(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default);

    Task<DownstairsResult> CommitExtentAsync(ulong jobId, int extent, ExtentMeta meta, CancellationToken cancellationToken = default);

    Task<DownstairsResult> MarkRepairPendingAsync(ulong jobId, IReadOnlyList<int> extents, CancellationToken cancellationToken = default);
}

/// <summary>Opens a connection to one replica (TCP in production, scripted in tests).</summary>
internal interface IDownstairsConnector
{
    Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, CancellationToken cancellationToken);
}

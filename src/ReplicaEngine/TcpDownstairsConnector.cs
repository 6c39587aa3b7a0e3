using System.Net;
using NbdServer.Downstairs.Client;
using NbdServer.Downstairs.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>Connects to real downstairs processes over TCP.</summary>
internal sealed class TcpDownstairsConnector(IReadOnlyList<IPEndPoint> endPoints) : IDownstairsConnector
{
    public async Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, CancellationToken cancellationToken) =>
        new Adapter(await DownstairsClient.ConnectAsync(endPoints[replica], hello, new DownstairsClientOptions(), cancellationToken));

    /// <summary>The client already has the right shape; this only names it as the engine's interface.</summary>
    private sealed class Adapter(DownstairsClient client) : IDownstairs
    {
        public HelloReply Region => client.Region;

        public Task<DownstairsResult> WriteAsync(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes, CancellationToken cancellationToken = default) =>
            client.WriteAsync(jobId, firstBlock, data, hashes, cancellationToken);

        public Task<DownstairsResult> ReadAsync(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes, CancellationToken cancellationToken = default) =>
            client.ReadAsync(jobId, firstBlock, data, hashes, cancellationToken);

        public Task<DownstairsResult> FlushAsync(ulong jobId, ulong flushNumber, ulong generation, CancellationToken cancellationToken = default) =>
            client.FlushAsync(jobId, flushNumber, generation, cancellationToken);

        public Task<ExtentReadResult> ReadExtentAsync(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data, CancellationToken cancellationToken = default) =>
            client.ReadExtentAsync(jobId, range, contexts, data, cancellationToken);

        public Task<DownstairsResult> WriteExtentAsync(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data, CancellationToken cancellationToken = default) =>
            client.WriteExtentAsync(jobId, range, contexts, data, cancellationToken);

        public Task<DownstairsResult> CommitExtentAsync(ulong jobId, int extent, ExtentMeta meta, CancellationToken cancellationToken = default) =>
            client.CommitExtentAsync(jobId, extent, meta, cancellationToken);

        public Task<DownstairsResult> MarkRepairPendingAsync(ulong jobId, IReadOnlyList<int> extents, CancellationToken cancellationToken = default) =>
            client.MarkRepairPendingAsync(jobId, extents, cancellationToken);

        public ValueTask DisposeAsync() => client.DisposeAsync();
    }
}

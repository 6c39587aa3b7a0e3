using System.Net;
using NbdServer.Common.Tls;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine;

/// <summary>
/// Connects to real downstairs processes over TCP, with mutual TLS when configured. Every
/// connection of the volume (startup probes, activation, reconnects, and with them repair) comes
/// through here, so none of them can be plaintext when TLS is set.
/// </summary>
internal sealed class TcpDownstairsConnector(IReadOnlyList<IPEndPoint> endPoints, IReadOnlyList<DownstairsClientOptions>? options = null) : IDownstairsConnector
{
    /// <summary>The connector <paramref name="engine"/> describes; loads its TLS directory (throws <see cref="TlsSetupException"/> naming a missing file).</summary>
    public static TcpDownstairsConnector Create(EngineOptions engine)
    {
        if (engine.DownstairsTlsDir is not { } dir)
        {
            return new TcpDownstairsConnector(engine.Downstairs);
        }
        // Loaded once for the life of the volume; the policies share it.
        TlsCredentials credentials = TlsCredentials.LoadClient(dir, requireCertificate: true);
        var perReplica = new DownstairsClientOptions[engine.Downstairs.Count];
        for (int i = 0; i < perReplica.Length; i++)
        {
            byte[]? pin = null;
            if (engine.DownstairsTlsPins.Count > 0)
            {
                TlsPeerVerifier.TryParsePin(engine.DownstairsTlsPins[engine.DownstairsTlsPins.Count == 1 ? 0 : i], out byte[] parsed);
                pin = parsed;
            }
            string? name = engine.DownstairsTlsNames.Count switch
            {
                0 => null,
                1 => engine.DownstairsTlsNames[0],
                _ => engine.DownstairsTlsNames[i],
            };
            perReplica[i] = new DownstairsClientOptions { Tls = new TlsClientPolicy(credentials, pin) { CoalesceWrites = true }, TlsServerName = name };
        }
        return new TcpDownstairsConnector(engine.Downstairs, perReplica);
    }

    public async Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, CancellationToken cancellationToken) =>
        new ClientAdapter(await DownstairsClient.ConnectAsync(endPoints[replica], hello, options?[replica] ?? new DownstairsClientOptions(), cancellationToken));

    /// <summary>
    /// The client already has the right shape; this only names it as the engine's interface (also
    /// for tests that put a real client in front of a fake downstairs).
    /// </summary>
    internal sealed class ClientAdapter(DownstairsClient client) : IDownstairs
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

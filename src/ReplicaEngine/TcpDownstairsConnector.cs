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

    public async Task<IDownstairs> ConnectAsync(int replica, HelloRequest hello, IDownstairsReplyHandler replies, CancellationToken cancellationToken) =>
        new ClientAdapter(await DownstairsClient.ConnectAsync(endPoints[replica], hello, options?[replica] ?? new DownstairsClientOptions(), cancellationToken), replies);

    /// <summary>The client under the engine's name for it, with the connection's reply sink bound (also for tests that put a real client in front of a fake downstairs).</summary>
    internal sealed class ClientAdapter(DownstairsClient client, IDownstairsReplyHandler replies) : IDownstairs
    {
        public HelloReply Region => client.Region;

        public void SubmitWrite(ulong jobId, long firstBlock, ReadOnlyMemory<byte> data, ReadOnlyMemory<byte> hashes) =>
            client.SubmitWrite(jobId, firstBlock, data, hashes, replies);

        public void SubmitRead(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes) =>
            client.SubmitRead(jobId, firstBlock, data, hashes, replies);

        public void SubmitFlush(ulong jobId, ulong flushNumber, ulong generation) =>
            client.SubmitFlush(jobId, flushNumber, generation, replies);

        public void SubmitReadExtent(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data) =>
            client.SubmitReadExtent(jobId, range, contexts, data, replies);

        public void SubmitWriteExtent(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data) =>
            client.SubmitWriteExtent(jobId, range, contexts, data, replies);

        public void SubmitCommitExtent(ulong jobId, int extent, ExtentMeta meta, bool inPlace) =>
            client.SubmitCommitExtent(jobId, extent, meta, inPlace, replies);

        public void SubmitMarkRepairPending(ulong jobId, IReadOnlyList<int> extents) =>
            client.SubmitMarkRepairPending(jobId, extents, replies);

        public void BeginBatch() => client.BeginBatch();

        public void EndBatch() => client.EndBatch();

        public ValueTask DisposeAsync() => client.DisposeAsync();
    }
}

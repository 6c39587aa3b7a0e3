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
            Forward(jobId, client.WriteAsync(jobId, firstBlock, data, hashes));

        public void SubmitRead(ulong jobId, long firstBlock, Memory<byte> data, Memory<byte> hashes) =>
            Forward(jobId, client.ReadAsync(jobId, firstBlock, data, hashes));

        public void SubmitFlush(ulong jobId, ulong flushNumber, ulong generation) =>
            Forward(jobId, client.FlushAsync(jobId, flushNumber, generation));

        public void SubmitReadExtent(ulong jobId, ExtentRange range, Memory<byte> contexts, Memory<byte> data) =>
            client.ReadExtentAsync(jobId, range, contexts, data).ContinueWith(
                t => replies.OnReply(jobId, t.IsCompletedSuccessfully ? t.Result.Result : Lost(t), t.IsCompletedSuccessfully ? t.Result.Meta : default),
                CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

        public void SubmitWriteExtent(ulong jobId, ExtentRange range, ReadOnlyMemory<byte> contexts, ReadOnlyMemory<byte> data) =>
            Forward(jobId, client.WriteExtentAsync(jobId, range, contexts, data));

        public void SubmitCommitExtent(ulong jobId, int extent, ExtentMeta meta) =>
            Forward(jobId, client.CommitExtentAsync(jobId, extent, meta));

        public void SubmitMarkRepairPending(ulong jobId, IReadOnlyList<int> extents) =>
            Forward(jobId, client.MarkRepairPendingAsync(jobId, extents));

        public void EndBatch()
        {
        }

        public ValueTask DisposeAsync() => client.DisposeAsync();

        private void Forward(ulong jobId, Task<DownstairsResult> task) =>
            task.ContinueWith(t => replies.OnReply(jobId, t.IsCompletedSuccessfully ? t.Result : Lost(t), default),
                CancellationToken.None, TaskContinuationOptions.ExecuteSynchronously, TaskScheduler.Default);

        private static DownstairsResult Lost(Task t) =>
            new(ResultCode.ConnectionLost, 0, t.Exception?.InnerException?.Message ?? "cancelled");
    }
}

/// <summary>Where one connection's replies go: called exactly once per submitted job, after the connection is done with its memory.</summary>
internal interface IDownstairsReplyHandler
{
    void OnReply(ulong jobId, DownstairsResult result, ExtentMeta meta);
}

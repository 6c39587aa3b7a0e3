using System.Collections.Concurrent;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Tls;

namespace NbdServer.Downstairs.Server;

/// <summary>
/// Accepts engine connections for one region. With <paramref name="tls"/>, each accepted socket must
/// complete a mutual TLS handshake (a client certificate from our CA, on the allowlist if there is
/// one) before the connection reads its first Hello byte. The policy should have
/// <see cref="TlsServerPolicy.CoalesceWrites"/> on: the connection's frame sender flushes after each batch.
/// </summary>
internal sealed partial class DownstairsServer(RegionHost host, TlsServerPolicy? tls = null) : IAsyncDisposable
{
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<DownstairsConnection, Task> _connections = new();
    private Socket? _listener;
    private Task? _acceptLoop;

    /// <summary>Handshakes refused so far (tests; the log has the reasons, throttled).</summary>
    public long TlsRefusals => Interlocked.Read(ref _tlsRefusals);

    private long _tlsRefusals;
    private int _handshaking;

    public IPEndPoint? LocalEndPoint => _listener?.LocalEndPoint as IPEndPoint;

    public IPEndPoint Start()
    {
        var listener = new Socket(host.Options.Listen.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        listener.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        listener.Bind(host.Options.Listen);
        listener.Listen(64);
        _listener = listener;
        var bound = (IPEndPoint)listener.LocalEndPoint!;
        DownstairsLog.Listening(host.Logger, bound);
        if (tls is not null)
        {
            DownstairsLog.TlsRequired(host.Logger, tls.Credentials.Directory, tls.AllowedClients.Count == 0 ? "any client certificate issued by the CA" : string.Join(", ", tls.AllowedClients));
        }
        _acceptLoop = AcceptLoopAsync(listener);
        return bound;
    }

    /// <summary>Serves one already-connected stream (in-process tests).</summary>
    public Task ServeAsync(Stream stream, EndPoint? remote = null)
    {
        var connection = new DownstairsConnection(host, stream, remote);
        Task task = RunAsync(connection);
        return task;
    }

    private async Task AcceptLoopAsync(Socket listener)
    {
        while (!_stop.IsCancellationRequested)
        {
            Socket socket;
            try
            {
                socket = await listener.AcceptAsync(_stop.Token).ConfigureAwait(false);
            }
            catch (Exception e) when (e is OperationCanceledException or ObjectDisposedException or SocketException)
            {
                if (_stop.IsCancellationRequested)
                {
                    return;
                }
                host.Throttle.Report(LogLevel.Warning, "accept failed", () => e.Message);
                await Task.Delay(100).ConfigureAwait(false);
                continue;
            }
            // Connections still in their TLS handshake hold a slot too: a flood of silent strangers
            // must not get past the cap by never finishing the handshake.
            int open = _connections.Count + Volatile.Read(ref _handshaking);
            if (open >= host.Options.MaxConnections)
            {
                DownstairsLog.TooManyConnections(host.Logger, socket.RemoteEndPoint, open);
                socket.Dispose();
                continue;
            }
            socket.NoDelay = true;
            if (tls is null)
            {
                _ = RunAsync(new DownstairsConnection(host, new NetworkStream(socket, ownsSocket: true), socket.RemoteEndPoint));
                continue;
            }
            Interlocked.Increment(ref _handshaking);
            _ = HandshakeThenRunAsync(tls, socket);
        }
    }

    private async Task HandshakeThenRunAsync(TlsServerPolicy policy, Socket socket)
    {
        EndPoint? remote = null;
        SslStream stream;
        try
        {
            remote = socket.RemoteEndPoint;
            stream = await policy.AuthenticateAsync(new NetworkStream(socket, ownsSocket: true), host.Options.TlsHandshakeTimeout, _stop.Token).ConfigureAwait(false);
        }
        catch (TlsHandshakeException e)
        {
            Interlocked.Decrement(ref _handshaking);
            Interlocked.Increment(ref _tlsRefusals);
            // One line per reason per interval: a scanner or a misconfigured peer retrying every
            // 100 ms must not flood the journal.
            host.Throttle.Report(LogLevel.Warning, ThrottleKey(e.Message), () => $"{remote}: refused before Hello: {e.Message}");
            return;
        }
        catch (Exception e)
        {
            // Stopping, or a socket that died before the handshake began; whatever it was, it must
            // neither end the process nor keep the connection slot.
            Interlocked.Decrement(ref _handshaking);
            socket.Dispose();
            if (e is not OperationCanceledException)
            {
                host.Throttle.Report(LogLevel.Warning, $"TLS handshake failed: {e.GetType().Name}", () => $"{remote}: TLS handshake failed: {e.Message}");
            }
            return;
        }
        string peer = stream.RemoteCertificate is X509Certificate2 c ? TlsPeerVerifier.Describe(c) : "(none)";
        DownstairsLog.TlsAuthenticated(host.Logger, remote, peer, stream.SslProtocol.ToString(), stream.NegotiatedCipherSuite.ToString());
        // RunAsync registers the connection before its first await, so the slot is never uncounted.
        Task run = RunAsync(new DownstairsConnection(host, stream, remote));
        Interlocked.Decrement(ref _handshaking);
        await run.ConfigureAwait(false);
    }

    private async Task RunAsync(DownstairsConnection connection)
    {
        var done = new TaskCompletionSource();
        _connections[connection] = done.Task;
        try
        {
            await Task.Run(() => connection.RunAsync(_stop.Token)).ConfigureAwait(false);
        }
        finally
        {
            _connections.TryRemove(connection, out _);
            done.TrySetResult();
        }
    }

    public async ValueTask DisposeAsync()
    {
        await _stop.CancelAsync().ConfigureAwait(false);
        _listener?.Dispose();
        foreach (DownstairsConnection c in _connections.Keys)
        {
            c.Shutdown();
        }
        await Task.WhenAll(_connections.Values).WaitAsync(TimeSpan.FromSeconds(5)).ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        if (_acceptLoop is not null)
        {
            await _acceptLoop.ConfigureAwait(ConfigureAwaitOptions.SuppressThrowing);
        }
        _stop.Dispose();
        DownstairsLog.Stopped(host.Logger);
    }

    /// <summary>
    /// The throttle key of a refusal: its reason without the parts the peer chooses (quoted
    /// certificate names, dates, numbers), so a scanner that varies its certificate still lands in
    /// one key per kind of refusal instead of one log line per attempt.
    /// </summary>
    private static string ThrottleKey(string reason) => "TLS refused: " + PeerChosen().Replace(reason, "_");

    [System.Text.RegularExpressions.GeneratedRegex(@"'[^']*'|\([^)]*\)|[0-9]+")]
    private static partial System.Text.RegularExpressions.Regex PeerChosen();
}

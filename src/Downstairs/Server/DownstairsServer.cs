using System.Collections.Concurrent;
using System.Net;
using System.Net.Security;
using System.Net.Sockets;
using System.Security.Cryptography.X509Certificates;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Net;
using NbdServer.Common.Tls;

namespace NbdServer.Downstairs.Server;

/// <summary>
/// Accepts engine connections for one region. With <paramref name="tls"/>, each accepted socket must
/// complete a mutual TLS handshake (a client certificate from our CA, on the allowlist if there is
/// one) before the connection reads its first Hello byte. The policy should have
/// <see cref="TlsServerPolicy.CoalesceWrites"/> on: the connection's frame sender flushes after each batch.
/// </summary>
internal sealed partial class DownstairsServer : IAsyncDisposable
{
    private readonly RegionHost host;
    private readonly TlsServerPolicy? tls;
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<DownstairsConnection, Task> _connections = new();
    /// <summary>Sockets still in their TLS handshake, with when they were accepted and from where.</summary>
    private readonly ConcurrentDictionary<Socket, (long Started, IPAddress? From)> _handshakes = new();
    private readonly ITimer _sweep;
    private Socket? _listener;
    private Task? _acceptLoop;
    private long _tlsRefusals;

    public DownstairsServer(RegionHost host, TlsServerPolicy? tls = null)
    {
        this.host = host;
        this.tls = tls;
        _sweep = TimeProvider.System.CreateTimer(_ => Sweep(), null, SweepPeriod(host.Options), SweepPeriod(host.Options));
    }

    /// <summary>Handshakes refused so far (tests; the log has the reasons, throttled).</summary>
    public long TlsRefusals => Interlocked.Read(ref _tlsRefusals);

    /// <summary>Checks every connection's idle and frame deadlines a few times per the shortest of them.</summary>
    private static TimeSpan SweepPeriod(DownstairsOptions o) =>
        TimeSpan.FromTicks(Math.Clamp(Math.Min(Math.Min(o.IdleTimeout.Ticks, o.FrameTimeout.Ticks), o.SendTimeout.Ticks) / 4, TimeSpan.TicksPerMillisecond * 50, TimeSpan.TicksPerSecond));

    private void Sweep()
    {
        long now = System.Diagnostics.Stopwatch.GetTimestamp();
        foreach (DownstairsConnection c in _connections.Keys)
        {
            c.CheckDeadlines(now);
        }
    }

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
        _acceptLoop = AcceptLoop.RunAsync(listener, Accepted, _stop.Token, e => host.Throttle.Report(LogLevel.Warning, "accept failed", () => e.Message));
        return bound;
    }

    /// <summary>Serves one already-connected stream (in-process tests).</summary>
    public Task ServeAsync(Stream stream, EndPoint? remote = null)
    {
        var connection = new DownstairsConnection(host, stream, remote);
        Task task = RunAsync(connection);
        return task;
    }

    /// <summary>One accepted socket (on the common accept loop): make room if the pre-Hello slots are full, then serve it.</summary>
    private void Accepted(Socket socket)
    {
        EvictOldestSilentIfFull(socket.RemoteEndPoint);
        socket.NoDelay = true;
        if (tls is null)
        {
            _ = RunAsync(new DownstairsConnection(host, new NetworkStream(socket, ownsSocket: true), socket.RemoteEndPoint));
            return;
        }
        EvictOldestHandshakeIfFull(socket.RemoteEndPoint);
        _handshakes[socket] = (System.Diagnostics.Stopwatch.GetTimestamp(), (socket.RemoteEndPoint as IPEndPoint)?.Address);
        _ = HandshakeThenRunAsync(tls, socket);
    }

    /// <summary>
    /// Connections that have not said Hello yet are capped at --max-connections. A new one does not
    /// wait for a slot: it takes the slot of the oldest silent one, so a flood of silent sockets
    /// cannot keep the real upstairs from reaching Hello (and after Hello the writer is always admitted).
    /// </summary>
    private void EvictOldestSilentIfFull(EndPoint? remote)
    {
        DownstairsConnection? oldest = null;
        int silent = 0;
        foreach (DownstairsConnection c in _connections.Keys)
        {
            if (!c.Negotiated)
            {
                silent++;
                if (oldest is null || c.Started < oldest.Started)
                {
                    oldest = c;
                }
            }
        }
        if (silent >= host.Options.MaxConnections && oldest is not null)
        {
            host.Throttle.Report(LogLevel.Warning, "connections before Hello at --max-connections", () => $"{silent} connections have not said Hello; closing the oldest ({oldest.Remote}) for {remote}");
            oldest.Close("evicted: too many connections before Hello (--max-connections)");
        }
    }

    /// <summary>
    /// Sockets in their TLS handshake are capped at --max-connections the same way: a flood of
    /// strangers that never finish the handshake only ever pushes out the oldest of its own kind, so
    /// the real upstairs always gets to handshake.
    /// </summary>
    private void EvictOldestHandshakeIfFull(EndPoint? remote)
    {
        if (_handshakes.Count < host.Options.MaxConnections)
        {
            return;
        }
        // The victim comes from the address holding the most pending handshakes: a flood from one
        // host (however fast it reconnects) then only ever evicts its own sockets, and the upstairs,
        // with one handshake from its own address, is never the one pushed out.
        var perAddress = new Dictionary<IPAddress, int>();
        foreach ((long _, IPAddress? from) in _handshakes.Values)
        {
            if (from is not null)
            {
                perAddress[from] = perAddress.GetValueOrDefault(from) + 1;
            }
        }
        IPAddress? busiest = perAddress.Count == 0 ? null : perAddress.MaxBy(p => p.Value).Key;
        KeyValuePair<Socket, (long Started, IPAddress? From)>? victim = null;
        foreach (KeyValuePair<Socket, (long Started, IPAddress? From)> h in _handshakes)
        {
            if (Equals(h.Value.From, busiest) && (victim is null || h.Value.Started < victim.Value.Value.Started))
            {
                victim = h;
            }
        }
        if (victim is { } v && _handshakes.TryRemove(v.Key, out _))
        {
            host.Throttle.Report(LogLevel.Warning, "TLS handshakes at --max-connections", () => $"{_handshakes.Count + 1} TLS handshakes in progress; closing the oldest from {busiest}, the busiest address, for {remote}");
            v.Key.Dispose();
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
            _handshakes.TryRemove(socket, out _);
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
            _handshakes.TryRemove(socket, out _);
            socket.Dispose();
            if (e is not OperationCanceledException)
            {
                host.Throttle.Report(LogLevel.Warning, $"TLS handshake failed: {e.GetType().Name}", () => $"{remote}: TLS handshake failed: {e.Message}");
            }
            return;
        }
        string peer = stream.RemoteCertificate is X509Certificate2 c ? TlsPeerVerifier.Describe(c) : "(none)";
        DownstairsLog.TlsAuthenticated(host.Logger, remote, peer, stream.SslProtocol.ToString(), stream.NegotiatedCipherSuite.ToString());
        if (!_handshakes.TryRemove(socket, out _))
        {
            // Evicted the moment the handshake completed: its socket is already closed.
            await stream.DisposeAsync().ConfigureAwait(false);
            return;
        }
        await RunAsync(new DownstairsConnection(host, stream, remote)).ConfigureAwait(false);
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
        await _sweep.DisposeAsync().ConfigureAwait(false);
        foreach (Socket s in _handshakes.Keys)
        {
            s.Dispose();
        }
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

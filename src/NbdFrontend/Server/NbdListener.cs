using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Net;
using NbdServer.Common.Posix;
using NbdServer.Common.Tls;

namespace NbdServer.Frontend.Server;

/// <summary>
/// Accepts NBD clients on a TCP endpoint and/or a Unix socket and runs each as an <see cref="NbdConnection"/>.
/// Shutdown drains: new requests get ESHUTDOWN, in-flight ones are answered, then sockets close.
/// </summary>
internal sealed class NbdListener : IAsyncDisposable
{
    /// <summary>Receive buffer segment: large enough that a 1 MiB write arrives in a few reads.</summary>
    private const int ReadBufferSize = 256 * 1024;

    private readonly ExportRegistry _exports;
    private readonly FrontendOptions _options;
    private readonly ILogger _logger;
    private readonly ByteBudget _serverBudget;
    private readonly LogThrottle _throttle;
    private readonly ConcurrentDictionary<long, (NbdConnection Connection, Task Running)> _connections = new();
    private int _tcpConnections;
    private int _unixConnections;
    private readonly CancellationTokenSource _stopping = new();

    // Accepting stops on its own at a reload, while connections still finish their handshakes.
    private readonly CancellationTokenSource _accepting = new();
    private bool _handedOver;
    private readonly TlsServerPolicy? _tls;
    private readonly TimeProvider _time;
    private Socket? _socket;
    private Socket? _unixSocket;
    private Task? _acceptLoop;
    private Task? _unixAcceptLoop;
    private long _nextId;

    /// <param name="tls">
    /// The TLS server side of STARTTLS; when null and <see cref="FrontendOptions.Tls"/> is not off,
    /// it is loaded from <see cref="FrontendOptions.TlsDir"/>.
    /// </param>
    /// <param name="time">The clock of the payload and send deadlines (tests pass a fake one).</param>
    public NbdListener(ExportRegistry exports, FrontendOptions options, ILogger logger, TlsServerPolicy? tls = null, TimeProvider? time = null)
    {
        options.Validate();
        _time = time ?? TimeProvider.System;
        _exports = exports;
        _options = options;
        _logger = logger;
        _serverBudget = new ByteBudget(options.MaxInFlightBytesTotal);
        _throttle = new LogThrottle(logger, options.LogThrottleInterval);
        if (options.Tls != TlsMode.Off)
        {
            // CoalesceWrites: the reply writer flushes after each batch, so a batch leaves in one send.
            _tls = tls ?? new TlsServerPolicy(TlsCredentials.LoadServer(options.TlsDir!, requireCa: options.TlsVerifyClient), options.TlsVerifyClient) { CoalesceWrites = true };
        }
    }

    public IPEndPoint LocalEndPoint => (IPEndPoint)(_socket?.LocalEndPoint ?? throw new InvalidOperationException("no TCP listener"));

    public int ConnectionCount => _connections.Count;

    /// <summary>Payload bytes all connections hold right now (the server-wide byte budget in use).</summary>
    public long BytesInFlight => _serverBudget.InUse;

    /// <param name="handed">
    /// What the previous image of this server handed over on reload: its listening sockets (used
    /// when they are where this configuration listens) and its attached clients (resumed between
    /// two requests). Null on a fresh start.
    /// </param>
    public void Start(HandoverState? handed = null)
    {
        string exports = string.Join(", ", _exports.All.Select(e => $"'{e.Name}' ({e.Volume.Size} bytes{(e.IsReadOnly ? ", read-only" : "")})"));
        Socket? handedTcp = Adopt(handed, HandedListenerKind.Tcp);
        Socket? handedUnix = Adopt(handed, HandedListenerKind.Unix);
        if (_options.UnixSocketPath is { } path)
        {
            // Taken over with its file, whose mode stays as it was bound (a chmod by path could follow
            // a symlink swapped in for the socket; see UnixSocketListener): a new unix-mode needs a restart.
            _unixSocket = TakeIfListeningOn(ref handedUnix, $"Unix socket {path}", s => s.LocalEndPoint?.ToString() == path)
                ?? UnixSocketListener.Bind(path, _options.UnixSocketFileMode(), _logger);
            FrontendLog.ListeningUnix(_logger, path, _options.UnixSocketMode);
            _unixAcceptLoop = AcceptLoop.RunAsync(_unixSocket, Accepted, _accepting.Token);
        }
        if (_options.Listen is { } listen)
        {
            _socket = TakeIfListeningOn(ref handedTcp, $"TCP {listen}", s => listen.Equals(s.LocalEndPoint) || (listen.Port == 0 && listen.Address.Equals(((IPEndPoint?)s.LocalEndPoint)?.Address)));
            if (_socket is null)
            {
                var socket = new Socket(listen.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
                try
                {
                    socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
                    socket.Bind(listen);
                    socket.Listen(128);
                }
                catch
                {
                    socket.Dispose();
                    throw;
                }
                _socket = socket;
            }
            FrontendLog.Listening(_logger, LocalEndPoint.ToString(), exports);
            _acceptLoop = AcceptLoop.RunAsync(_socket, Accepted, _accepting.Token);
        }
        else
        {
            FrontendLog.Listening(_logger, "no TCP port", exports);
        }
        handedTcp?.Dispose();
        handedUnix?.Dispose();
        if (handed is not null)
        {
            int resumed = handed.Sessions.Count(Resume);
            FrontendLog.TookOver(_logger, resumed, handed.Listeners.Count);
        }
    }

    private Socket? Adopt(HandoverState? handed, HandedListenerKind kind)
    {
        if (handed?.Listeners.FirstOrDefault(l => l.Kind == kind) is not { } listener)
        {
            return null;
        }
        return Adopt(listener.Fd, $"{kind} listener");
    }

    /// <summary>
    /// A socket from an inherited descriptor, close-on-exec again (a later reload clears it only for
    /// what it hands on). Null with one log line when the descriptor is not a socket: its handle is
    /// then disowned, so no finalizer closes whatever file has that number.
    /// </summary>
    private Socket? Adopt(int fd, string what)
    {
        var handle = new SafeSocketHandle(fd, ownsHandle: true);
        try
        {
            var socket = new Socket(handle);
            ProcessImage.CloseOnExec(fd);
            return socket;
        }
        catch (Exception e) when (e is SocketException or IOException)
        {
            handle.SetHandleAsInvalid();
            FrontendLog.HandedNotUsed(_logger, $"{what} (descriptor {fd})", e.Message);
            return null;
        }
    }

    /// <summary>The handed listener when it listens where this configuration does (a changed address binds anew).</summary>
    private Socket? TakeIfListeningOn(ref Socket? handed, string where, Func<Socket, bool> matches)
    {
        if (handed is null)
        {
            return null;
        }
        if (!matches(handed))
        {
            FrontendLog.HandedNotUsed(_logger, $"listener on {handed.LocalEndPoint}", $"this configuration listens on {where}");
            return null;
        }
        Socket taken = handed;
        handed = null;
        return taken;
    }

    /// <summary>A client handed over between two requests: served from its next request on, no handshake.</summary>
    private bool Resume(HandedSession handed)
    {
        if (Adopt(handed.Fd, "connection") is not { } client)
        {
            return false;
        }
        if (!_exports.TryGet(handed.ExportName, out NbdExport export))
        {
            FrontendLog.HandedNotUsed(_logger, $"connection to export '{handed.ExportName}'", "this configuration has no such export");
            client.Dispose();
            return false;
        }
        bool unix = client.AddressFamily == AddressFamily.Unix;
        Interlocked.Increment(ref unix ? ref _unixConnections : ref _tcpConnections);
        long id = Interlocked.Increment(ref _nextId);
        var session = new NegotiatedSession(export, handed.Flags, handed.StructuredReplies, handed.BaseAllocation);
        _ = RunConnection(id, new Transport(new NetworkStream(client, ownsSocket: true), client, ReadBufferSize, handed.Pending),
            () => Interlocked.Decrement(ref unix ? ref _unixConnections : ref _tcpConnections), session);
        return true;
    }

    /// <summary>
    /// Reload: stops accepting (the listening sockets stay open, so clients queue in the backlog)
    /// and stops every connection between two requests once what it admitted is answered. What
    /// can be handed over is returned with its sockets; the rest is closed. This listener is done
    /// afterwards: the next image serves from here.
    /// </summary>
    public async Task<(HandoverState State, IReadOnlyList<Socket> Sockets, int Closed)> HandOverAsync()
    {
        _handedOver = true;
        _accepting.Cancel();
        if (_acceptLoop is not null)
        {
            await _acceptLoop;
        }
        if (_unixAcceptLoop is not null)
        {
            await _unixAcceptLoop;
        }
        var connections = _connections.Values.ToList();
        Task<HandedConnection?>[] stopping = [.. connections.Select(c => c.Connection.HandOverAsync())];
        Task all = Task.WhenAll(stopping);
        if (await Task.WhenAny(all, Task.Delay(_options.HandoverTimeout, _time)) != all)
        {
            for (int i = 0; i < stopping.Length; i++)
            {
                if (!stopping[i].IsCompleted)
                {
                    connections[i].Connection.Abort();
                }
            }
            await all.WaitAsync(_options.ShutdownTimeout).ContinueWith(static _ => { }, TaskScheduler.Default);
        }
        HandedConnection?[] results = [.. stopping.Select(t => t.IsCompletedSuccessfully ? t.Result : null)];
        // Every connection's requests done (a closed one's included) before the volume is closed under them.
        await Task.WhenAll(connections.Select(c => c.Running)).WaitAsync(_options.ShutdownTimeout).ContinueWith(static _ => { }, TaskScheduler.Default);
        var sockets = new List<Socket>();
        var listeners = new List<HandedListener>();
        if (_socket is not null)
        {
            listeners.Add(new HandedListener(HandedListenerKind.Tcp, (int)_socket.Handle));
            sockets.Add(_socket);
        }
        if (_unixSocket is not null)
        {
            listeners.Add(new HandedListener(HandedListenerKind.Unix, (int)_unixSocket.Handle));
            sockets.Add(_unixSocket);
        }
        var sessions = new List<HandedSession>();
        foreach (HandedConnection? handed in results)
        {
            if (handed is null)
            {
                continue;
            }
            NegotiatedSession s = handed.Session;
            sessions.Add(new HandedSession((int)handed.Socket.Handle, s.Export.Name, s.Flags, s.StructuredReplies, s.BaseAllocation, handed.Pending));
            sockets.Add(handed.Socket);
        }
        return (new HandoverState(listeners, sessions), sockets, results.Length - sessions.Count);
    }

    /// <summary>Serves an already-connected stream (in-process tests use a duplex pipe).</summary>
    public Task ServeAsync(Stream stream)
    {
        long id = Interlocked.Increment(ref _nextId);
        return RunConnection(id, new Transport(stream, null, ReadBufferSize));
    }

    private void Accepted(Socket client)
    {
        long id = Interlocked.Increment(ref _nextId);
        // The Unix socket (root and the service only) and TCP each get their own MaxConnections:
        // strangers on a TCP port must never fill the slots the kernel client reconnects through.
        bool unix = client.AddressFamily == AddressFamily.Unix;
        if (Interlocked.Increment(ref unix ? ref _unixConnections : ref _tcpConnections) > _options.MaxConnections)
        {
            Interlocked.Decrement(ref unix ? ref _unixConnections : ref _tcpConnections);
            // Throttled: whoever fills the cap can otherwise write a line per refused connection.
            string remote = client.RemoteEndPoint?.ToString() ?? "?";
            _throttle.Report(LogLevel.Warning, $"NBD connection refused: the limit of {_options.MaxConnections} connections is reached", () => $"first: connection {id} from {remote}");
            client.Dispose();
            return;
        }
        if (!unix)
        {
            client.NoDelay = true;
        }
        FrontendLog.ConnectionOpened(_logger, id, client.RemoteEndPoint?.ToString() ?? "?");
        _ = RunConnection(id, new Transport(new NetworkStream(client, ownsSocket: true), client, ReadBufferSize),
            () => Interlocked.Decrement(ref unix ? ref _unixConnections : ref _tcpConnections));
    }

    private Task RunConnection(long id, Transport transport, Action? released = null, NegotiatedSession? resumed = null)
    {
        var connection = new NbdConnection(id, transport, _exports, _options, _serverBudget, _logger, _throttle, _tls, _time, resumed);
        var started = new TaskCompletionSource(TaskCreationOptions.RunContinuationsAsynchronously);
        Task running = Task.Run(async () =>
        {
            await started.Task;
            try
            {
                await connection.RunAsync(_stopping.Token);
            }
            finally
            {
                _connections.TryRemove(id, out _);
                released?.Invoke();
                await connection.DisposeAsync();
            }
        });
        _connections[id] = (connection, running);
        started.SetResult();
        return running;
    }

    /// <summary>Stops accepting, answers in-flight requests, then closes every connection.</summary>
    public async Task StopAsync()
    {
        if (_stopping.IsCancellationRequested || _handedOver)
        {
            // Stopped already, or handed over: the sockets belong to the next image now.
            return;
        }
        _accepting.Cancel();
        FrontendLog.ShuttingDown(_logger, _connections.Count);
        _socket?.Dispose();
        _unixSocket?.Dispose();
        if (_options.UnixSocketPath is { } path)
        {
            UnixSocketListener.Remove(path);
        }
        var connections = _connections.Values.ToList();
        Task drained = Task.WhenAll(connections.Select(c => c.Connection.BeginShutdownAsync()));
        await drained.WaitAsync(_options.ShutdownTimeout).ContinueWith(static _ => { }, TaskScheduler.Default);
        // Give clients that got ESHUTDOWN a moment to disconnect softly before we hard-close.
        await Task.WhenAll(connections.Select(c => c.Running)).WaitAsync(TimeSpan.FromMilliseconds(500)).ContinueWith(static _ => { }, TaskScheduler.Default);
        _stopping.Cancel();
        foreach ((NbdConnection connection, _) in _connections.Values)
        {
            connection.Abort();
        }
        await Task.WhenAll(connections.Select(c => c.Running)).WaitAsync(_options.ShutdownTimeout).ContinueWith(static _ => { }, TaskScheduler.Default);
        if (_acceptLoop is not null)
        {
            await _acceptLoop;
        }
        if (_unixAcceptLoop is not null)
        {
            await _unixAcceptLoop;
        }
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync();
        _throttle.Dispose();
        _stopping.Dispose();
        _accepting.Dispose();
    }
}

using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Net;

namespace NbdServer.Frontend.Server;

/// <summary>
/// Accepts NBD clients on a TCP endpoint and runs each as an <see cref="NbdConnection"/>.
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
    private readonly CancellationTokenSource _stopping = new();
    private Socket? _socket;
    private Task? _acceptLoop;
    private long _nextId;

    public NbdListener(ExportRegistry exports, FrontendOptions options, ILogger logger)
    {
        options.Validate();
        _exports = exports;
        _options = options;
        _logger = logger;
        _serverBudget = new ByteBudget(options.MaxInFlightBytesTotal);
        _throttle = new LogThrottle(logger, options.LogThrottleInterval);
    }

    public IPEndPoint LocalEndPoint => (IPEndPoint)(_socket?.LocalEndPoint ?? throw new InvalidOperationException("not started"));

    public int ConnectionCount => _connections.Count;

    public void Start()
    {
        var socket = new Socket(_options.Listen.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
        socket.Bind(_options.Listen);
        socket.Listen(128);
        _socket = socket;
        FrontendLog.Listening(_logger, LocalEndPoint.ToString(), string.Join(", ", _exports.All.Select(e => $"'{e.Name}' ({e.Volume.Size} bytes{(e.IsReadOnly ? ", read-only" : "")})")));
        _acceptLoop = AcceptLoop.RunAsync(socket, Accepted, _stopping.Token);
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
        if (_connections.Count >= _options.MaxConnections)
        {
            FrontendLog.TooManyConnections(_logger, id, _options.MaxConnections, client.RemoteEndPoint?.ToString() ?? "?");
            client.Dispose();
            return;
        }
        client.NoDelay = true;
        FrontendLog.ConnectionOpened(_logger, id, client.RemoteEndPoint?.ToString() ?? "?");
        _ = RunConnection(id, new Transport(new NetworkStream(client, ownsSocket: true), client, ReadBufferSize));
    }

    private Task RunConnection(long id, Transport transport)
    {
        var connection = new NbdConnection(id, transport, _exports, _options, _serverBudget, _logger, _throttle);
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
        if (_stopping.IsCancellationRequested)
        {
            return;
        }
        FrontendLog.ShuttingDown(_logger, _connections.Count);
        _socket?.Dispose();
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
    }

    public async ValueTask DisposeAsync()
    {
        await StopAsync();
        _throttle.Dispose();
        _stopping.Dispose();
    }
}

using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;

namespace NbdServer.Downstairs.Server;

/// <summary>Accepts engine connections for one region.</summary>
internal sealed class DownstairsServer(RegionHost host) : IAsyncDisposable
{
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<DownstairsConnection, Task> _connections = new();
    private Socket? _listener;
    private Task? _acceptLoop;

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
            if (_connections.Count >= host.Options.MaxConnections)
            {
                DownstairsLog.TooManyConnections(host.Logger, socket.RemoteEndPoint, _connections.Count);
                socket.Dispose();
                continue;
            }
            socket.NoDelay = true;
            var connection = new DownstairsConnection(host, new NetworkStream(socket, ownsSocket: true), socket.RemoteEndPoint);
            _ = RunAsync(connection);
        }
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
}

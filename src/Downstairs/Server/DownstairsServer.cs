using System.Collections.Concurrent;
using System.Net;
using System.Net.Sockets;
using Microsoft.Extensions.Logging;

namespace NbdServer.Downstairs.Server;

/// <summary>Accepts engine connections for one region.</summary>
internal sealed class DownstairsServer : IAsyncDisposable
{
    private readonly CancellationTokenSource _stop = new();
    private readonly ConcurrentDictionary<DownstairsConnection, Task> _connections = new();
    private readonly ITimer _sweep;
    private Socket? _listener;
    private Task? _acceptLoop;

    /// <summary>Checks every connection's idle and frame deadlines a few times per the shortest of them.</summary>
    private static TimeSpan SweepPeriod(DownstairsOptions o) =>
        TimeSpan.FromTicks(Math.Clamp(Math.Min(o.IdleTimeout.Ticks, o.FrameTimeout.Ticks) / 4, TimeSpan.TicksPerMillisecond * 50, TimeSpan.TicksPerSecond));

    public DownstairsServer(RegionHost host)
    {
        this.host = host;
        _sweep = TimeProvider.System.CreateTimer(_ => Sweep(), null, SweepPeriod(host.Options), SweepPeriod(host.Options));
    }

    private readonly RegionHost host;

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
            EvictOldestSilentIfFull(socket.RemoteEndPoint);
            socket.NoDelay = true;
            var connection = new DownstairsConnection(host, new NetworkStream(socket, ownsSocket: true), socket.RemoteEndPoint);
            _ = RunAsync(connection);
        }
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
        await _sweep.DisposeAsync().ConfigureAwait(false);
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

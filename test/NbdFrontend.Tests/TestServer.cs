using Microsoft.Extensions.Logging;
using Nerdbank.Streams;
using NbdServer.Common.Tls;
using NbdServer.Common.Volumes;
using NbdServer.Frontend.Server;

namespace NbdServer.Frontend.Tests;

/// <summary>An in-process NBD server whose connections are duplex streams (no sockets).</summary>
internal sealed class TestServer : IAsyncDisposable
{
    private readonly List<Task> _connections = [];

    public TestServer(FrontendOptions? options = null, params NbdExport[] exports)
        : this(options, null, exports)
    {
    }

    /// <param name="tls">The STARTTLS server side (certificates made in memory by the test).</param>
    public TestServer(FrontendOptions? options, TlsServerPolicy? tls, params NbdExport[] exports)
        : this(options, tls, null, exports)
    {
    }

    /// <param name="time">The clock of the connections' payload and send deadlines.</param>
    public TestServer(FrontendOptions? options, TlsServerPolicy? tls, TimeProvider? time, params NbdExport[] exports)
    {
        Logger = new CapturingLogger();
        Exports = new ExportRegistry(exports.Length > 0 ? exports : [new NbdExport("vol0", new Volumes.MemoryVolume(64L << 20), "test volume")]);
        Listener = new NbdListener(Exports, options ?? new FrontendOptions(), Logger, tls, time);
    }

    public CapturingLogger Logger { get; }

    public ExportRegistry Exports { get; }

    public NbdListener Listener { get; }

    public IBlockVolume Volume => Exports.Default.Volume;

    public NbdTestClient Connect(Func<Stream, Stream>? wrapServerSide = null)
    {
        (Stream client, Stream server) = FullDuplexStream.CreatePair();
        _connections.Add(Listener.ServeAsync(wrapServerSide is null ? server : wrapServerSide(server)));
        return new NbdTestClient(client);
    }

    /// <summary>Completes when every connection served so far has ended.</summary>
    public Task WhenConnectionsEndAsync() => Task.WhenAll(_connections).WaitAsync(TimeSpan.FromSeconds(10));

    public async ValueTask DisposeAsync()
    {
        await Listener.DisposeAsync();
        foreach (NbdExport export in Exports.All)
        {
            await export.Volume.DisposeAsync();
        }
    }
}

/// <summary>Keeps log lines so tests can check that a failure is reported once and clearly.</summary>
internal sealed class CapturingLogger : ILogger
{
    private readonly List<(LogLevel Level, string Message)> _lines = [];

    public IReadOnlyList<(LogLevel Level, string Message)> Lines
    {
        get
        {
            lock (_lines)
            {
                return [.. _lines];
            }
        }
    }

    public IEnumerable<string> Warnings => Lines.Where(l => l.Level >= LogLevel.Warning).Select(l => l.Message);

    public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

    public bool IsEnabled(LogLevel logLevel) => true;

    public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
    {
        lock (_lines)
        {
            _lines.Add((logLevel, formatter(state, exception)));
        }
    }
}

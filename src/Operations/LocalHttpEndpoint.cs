using System.Globalization;
using System.Net;
using System.Net.Sockets;
using System.Runtime.InteropServices;
using System.Text;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Hosting;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using Microsoft.AspNetCore.Server.Kestrel.Core;
using Microsoft.Extensions.DependencyInjection;
using Microsoft.Extensions.Logging;
using Microsoft.Extensions.Logging.Abstractions;
using NbdServer.Common.Logging;
using NbdServer.Common.Posix;

namespace NbdServer.Common.Hosting;

/// <summary>
/// An answer of a <see cref="LocalHttpEndpoint"/> route: status code, content type, body. An
/// <see cref="IResult"/>, so a minimal-API route returns it as it is.
/// </summary>
public readonly record struct LocalHttpResponse(int StatusCode, string ContentType, byte[] Body) : IResult
{
    public const string PlainText = "text/plain; charset=utf-8";

    public static LocalHttpResponse NotFound(string hint) => Text(StatusCodes.Status404NotFound, hint);

    public static LocalHttpResponse MethodNotAllowed(string hint) => Text(StatusCodes.Status405MethodNotAllowed, hint);

    public static LocalHttpResponse BadRequest(string reason) => Text(StatusCodes.Status400BadRequest, reason);

    public static LocalHttpResponse Text(int statusCode, string text) => new(statusCode, PlainText, Encoding.UTF8.GetBytes(text + "\n"));

    /// <summary>The status given as its status line ("400 Bad Request"): the code is its first three digits.</summary>
    public static LocalHttpResponse Text(string status, string text) =>
        Text(int.Parse(status.AsSpan(0, 3), NumberStyles.None, CultureInfo.InvariantCulture), text);

    public Task ExecuteAsync(HttpContext httpContext)
    {
        httpContext.Response.StatusCode = StatusCode;
        httpContext.Response.ContentType = ContentType;
        httpContext.Response.ContentLength = Body.Length;
        return httpContext.Response.Body.WriteAsync(Body, httpContext.RequestAborted).AsTask();
    }
}

/// <summary>The parts of a request a route looks at; <paramref name="Query"/> is the raw text after '?', or empty.</summary>
public readonly record struct LocalHttpRequest(string Method, string Path, string Query = "")
{
    public static LocalHttpRequest From(HttpRequest request) =>
        new(request.Method, request.Path.Value ?? "", request.QueryString.HasValue ? request.QueryString.Value![1..] : "");
}

/// <summary>Limits of the operator's local HTTP endpoints (control socket, metrics), set on Kestrel.</summary>
public sealed record LocalHttpLimits
{
    /// <summary>
    /// A request body's largest size. The control routes take their arguments in the query and
    /// have no body; 4 KiB leaves room for a small JSON document and refuses (413) anything that
    /// would make the daemon buffer more for a local client.
    /// </summary>
    public const int MaxRequestBodyBytes = 4096;

    /// <summary>The request line (method, path and query): a route's whole query fits with room to spare.</summary>
    public const int MaxRequestLineBytes = 4096;

    /// <summary>All request headers together: curl, HttpClient and a Prometheus scraper send under 1 KiB.</summary>
    public const int MaxRequestHeadersBytes = 8192;

    /// <summary>Request headers counted one by one (Kestrel's default is 100).</summary>
    public const int MaxRequestHeaderCount = 32;

    /// <summary>
    /// The slowest a client may send a body or read an answer, in bytes per second: Kestrel allows
    /// <see cref="Timeout"/> plus this rate's time for all the bytes so far, then closes the
    /// connection. 1 MiB/s: a client that reads at all reads far faster (a scrape of tens of KiB
    /// is given <see cref="Timeout"/> and a few ms more). Kestrel's default of 240 B/s would let a
    /// client that stopped reading an answer hold its connection for as many seconds as the
    /// socket buffers hold quarter-KiBs (measured: 64 KiB/s still held it 5.7 s past the start).
    /// </summary>
    public const int MinDataBytesPerSecond = 1 << 20;

    /// <summary>The shortest grace period of <see cref="MinDataBytesPerSecond"/> Kestrel accepts (over its 1 s check); a shorter <see cref="Timeout"/> uses this.</summary>
    public static readonly TimeSpan MinGracePeriod = TimeSpan.FromMilliseconds(1100);

    /// <summary>
    /// Connections served at once; more are closed at accept. Eight is plenty for a status
    /// watcher, a scrub command and a Prometheus scrape, and bounds what a local client that
    /// opens connections and never speaks can hold.
    /// </summary>
    public int MaxConnections { get; init; } = 8;

    /// <summary>
    /// Time a client may take to send a request's headers, to send its next request on a kept-alive
    /// connection, and (as the grace period of <see cref="MinDataBytesPerSecond"/>) to start reading
    /// its answer. A client that never sends, or never reads its answer, is dropped after this
    /// (Kestrel checks once a second, so up to a second later).
    /// </summary>
    public TimeSpan Timeout { get; init; } = TimeSpan.FromSeconds(5);

    public void Validate()
    {
        if (MaxConnections <= 0)
        {
            throw new ArgumentException($"MaxConnections must be positive (was {MaxConnections}).");
        }
        if (Timeout <= TimeSpan.Zero)
        {
            throw new ArgumentException($"Timeout must be positive (was {Timeout}).");
        }
    }

    /// <summary>These limits on a Kestrel server.</summary>
    internal void Apply(KestrelServerOptions kestrel)
    {
        kestrel.AddServerHeader = false;
        KestrelServerLimits l = kestrel.Limits;
        l.MaxConcurrentConnections = MaxConnections;
        l.MaxConcurrentUpgradedConnections = 0;
        l.MaxRequestBodySize = MaxRequestBodyBytes;
        l.MaxRequestLineSize = MaxRequestLineBytes;
        l.MaxRequestHeadersTotalSize = MaxRequestHeadersBytes;
        l.MaxRequestHeaderCount = MaxRequestHeaderCount;
        // What one connection may hold in buffers either way: its whole request, and an answer's worth.
        l.MaxRequestBufferSize = MaxRequestLineBytes + MaxRequestHeadersBytes + MaxRequestBodyBytes;
        l.RequestHeadersTimeout = Timeout;
        l.KeepAliveTimeout = Timeout;
        // Kestrel wants a grace period longer than its once-a-second check.
        TimeSpan grace = Timeout > MinGracePeriod ? Timeout : MinGracePeriod;
        l.MinRequestBodyDataRate = new MinDataRate(MinDataBytesPerSecond, grace);
        l.MinResponseDataRate = new MinDataRate(MinDataBytesPerSecond, grace);
    }
}

/// <summary>
/// An operator's local HTTP endpoint served by Kestrel (ASP.NET Core minimal APIs): the control
/// socket (a Unix socket) or the metrics port (TCP). HTTP/1.1 only, limits from
/// <see cref="LocalHttpLimits"/>, a request body read (and so bounded, 413 past the limit) before
/// any route sees the request. A Unix socket's file has <see cref="SocketMode"/> from the moment
/// it appears (<see cref="UnixSocketFile.Listen"/>; Kestrel is handed the listening socket). On
/// TCP the Host header must name a loopback address, <c>localhost</c> or the bound address: a web
/// page that rebinds its own DNS name to 127.0.0.1 sends its own name as Host and is refused, so a
/// browser can't be used to read the endpoint.
/// </summary>
/// <remarks>
/// Refusals (a foreign Host) and Kestrel's own warnings (a connection over the cap) go to
/// <c>throttle</c> when given, else nowhere: a storm is a summary.
/// </remarks>
public sealed partial class LocalHttpEndpoint(
    EndPoint endPoint,
    Action<IEndpointRouteBuilder> routes,
    LocalHttpLimits? limits = null,
    LogThrottle? throttle = null,
    Action<IServiceCollection>? services = null,
    string? notFoundHint = null) : IAsyncDisposable
{
    /// <summary>
    /// A Unix socket's file mode: owner read/write only. Connecting needs write permission, so only
    /// the server's own user (and root) can ask for status or start a scrub.
    /// </summary>
    public const UnixFileMode SocketMode = UnixFileMode.UserRead | UnixFileMode.UserWrite;

    private const int Backlog = 16;

    private readonly LocalHttpLimits _limits = limits ?? new LocalHttpLimits();
    private WebApplication? _app;
    private EndPoint? _bound;
    private string? _socketPath;
    private ulong _socketInode;

    /// <summary>Where it listens (for TCP port 0, the port chosen).</summary>
    public EndPoint LocalEndPoint => _bound ?? throw new InvalidOperationException("not started");

    /// <summary>
    /// Listens on the end point and starts serving. A Unix socket's file gets <see cref="SocketMode"/>
    /// (a stale one at the path is replaced, a live one refused) and is removed by <see cref="DisposeAsync"/>.
    /// </summary>
    public void Start() => StartAsync().GetAwaiter().GetResult();

    public async Task StartAsync()
    {
        _limits.Validate();
        Socket listener = Listen();
        // Kestrel owns the descriptor it is given (closes it at stop); it gets its own copy, so ours
        // is released here and the two never close the same number twice.
        int handle = dup((int)listener.SafeHandle.DangerousGetHandle());
        int errno = Marshal.GetLastPInvokeError();
        listener.Dispose();
        if (handle < 0)
        {
            RemoveSocketFile();
            throw new PosixIOException(errno, "dup", endPoint.ToString() ?? "");
        }
        WebApplication app;
        try
        {
            app = Build(handle);
        }
        catch
        {
            RemoveSocketFile();
            throw;
        }
        try
        {
            await app.StartAsync();
        }
        catch
        {
            // (If Kestrel failed before taking the descriptor, it stays open: the daemon exits on this anyway.)
            await app.DisposeAsync();
            RemoveSocketFile();
            throw;
        }
        _app = app;
    }

    /// <summary>The Kestrel application on the listening descriptor: limits, logging, Host check, body bound, routes.</summary>
    private WebApplication Build(int handle)
    {
        WebApplicationBuilder builder = WebApplication.CreateEmptyBuilder(new WebApplicationOptions { ApplicationName = "nbd-local-http" });
        builder.WebHost.UseKestrelCore().ConfigureKestrel(kestrel =>
        {
            _limits.Apply(kestrel);
            kestrel.ListenHandle((ulong)handle, listen => listen.Protocols = HttpProtocols.Http1);
        });
        builder.Services.AddRoutingCore();
        builder.Services.AddSingleton<ILoggerFactory>(throttle is null ? NullLoggerFactory.Instance : new ThrottledLoggerFactory(throttle, endPoint.ToString() ?? ""));
        services?.Invoke(builder.Services);
        WebApplication app = builder.Build();
        if (_bound is IPEndPoint bound)
        {
            app.Use((context, next) => IsLocalHost(context.Request.Host.Value ?? "", bound) ? next(context) : ForeignHost(context));
        }
        app.Use(BoundBodyAsync);
        app.UseRouting();
        routes(app);
        if (notFoundHint is not null)
        {
            // After routing: a path no route knows (404) or a method its route refuses (405) gets the list of routes.
            app.Use(async (context, next) =>
            {
                await next(context);
                if (context.Response is { StatusCode: 404 or 405, HasStarted: false })
                {
                    await LocalHttpResponse.Text(context.Response.StatusCode, notFoundHint).ExecuteAsync(context);
                }
            });
        }
        return app;
    }

    /// <summary>The listening socket: a Unix socket file with its mode, or a TCP port.</summary>
    private Socket Listen()
    {
        if (endPoint is UnixDomainSocketEndPoint unix)
        {
            _socketPath = unix.ToString();
            (Socket socket, _socketInode) = UnixSocketFile.Listen(_socketPath, SocketMode, Backlog);
            _bound = endPoint;
            return socket;
        }
        var tcp = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
        try
        {
            tcp.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            tcp.Bind(endPoint);
            tcp.Listen(Backlog);
            _bound = tcp.LocalEndPoint;
            return tcp;
        }
        catch
        {
            tcp.Dispose();
            throw;
        }
    }

    private Task ForeignHost(HttpContext context)
    {
        // A browser tricked by DNS rebinding sends the attacker's name here.
        string host = context.Request.Host.Value ?? "";
        throttle?.Report(LogLevel.Warning, $"{endPoint}: foreign Host", () => $"refused a request with Host '{host}'");
        return LocalHttpResponse.BadRequest("bad Host: this endpoint answers only to localhost or its own address").ExecuteAsync(context);
    }

    /// <summary>
    /// Reads the whole body before any route runs, so Kestrel's <see cref="LocalHttpLimits.MaxRequestBodyBytes"/>
    /// is enforced (413) even on a route that never reads it (else a POST with a huge body would act
    /// first and only then be cut off); a route that does read it reads the buffered copy.
    /// </summary>
    private static async Task BoundBodyAsync(HttpContext context, RequestDelegate next)
    {
        if (context.Request.ContentLength is not 0 && (context.Request.ContentLength is not null || context.Request.Headers.TransferEncoding.Count > 0))
        {
            context.Request.EnableBuffering(LocalHttpLimits.MaxRequestBodyBytes, LocalHttpLimits.MaxRequestBodyBytes);
            try
            {
                await context.Request.Body.CopyToAsync(Stream.Null, context.RequestAborted);
            }
            catch (Microsoft.AspNetCore.Http.BadHttpRequestException e)
            {
                await LocalHttpResponse.Text(e.StatusCode, $"request body over {LocalHttpLimits.MaxRequestBodyBytes} bytes or malformed").ExecuteAsync(context);
                return;
            }
            context.Request.Body.Position = 0;
        }
        await next(context);
    }

    /// <summary>
    /// True when the Host header (name or address, with an optional port) is <c>localhost</c>, a
    /// loopback address, or the address we are bound to; when bound to every address, any address
    /// literal (DNS rebinding needs a name, which a literal isn't).
    /// </summary>
    internal static bool IsLocalHost(string host, IPEndPoint bound)
    {
        string name = host;
        if (name.StartsWith('['))
        {
            int close = name.IndexOf(']', StringComparison.Ordinal);
            name = close < 0 ? "" : name[1..close];
        }
        else if (name.Count(c => c == ':') == 1)
        {
            name = name[..name.IndexOf(':', StringComparison.Ordinal)];
        }
        if (name.Equals("localhost", StringComparison.OrdinalIgnoreCase))
        {
            return true;
        }
        if (!IPAddress.TryParse(name, out IPAddress? address) || name.Length == 0)
        {
            return false;
        }
        return IPAddress.IsLoopback(address)
            || address.Equals(bound.Address)
            || bound.Address.Equals(IPAddress.Any)
            || bound.Address.Equals(IPAddress.IPv6Any);
    }

    public async ValueTask DisposeAsync()
    {
        if (_app is not null)
        {
            await _app.StopAsync();
            await _app.DisposeAsync();
            _app = null;
        }
        RemoveSocketFile();
    }

    private void RemoveSocketFile()
    {
        if (_socketPath is not null)
        {
            UnixSocketFile.Remove(_socketPath, _socketInode);
            _socketPath = null;
        }
    }

    [LibraryImport("libc", SetLastError = true)]
    private static partial int dup(int fd);

    /// <summary>Kestrel's and ASP.NET Core's log lines of one endpoint, warnings and worse, through the daemon's <see cref="LogThrottle"/>.</summary>
    private sealed class ThrottledLoggerFactory(LogThrottle throttle, string endPoint) : ILoggerFactory, ILoggerProvider
    {
        public ILogger CreateLogger(string categoryName) => new Logger(throttle, endPoint);

        public void AddProvider(ILoggerProvider provider)
        {
        }

        public void Dispose()
        {
        }

        private sealed class Logger(LogThrottle throttle, string endPoint) : ILogger
        {
            public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

            public bool IsEnabled(LogLevel logLevel) => logLevel >= LogLevel.Warning;

            public void Log<TState>(LogLevel logLevel, EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
            {
                if (IsEnabled(logLevel))
                {
                    // Keyed by the event, not its text: Kestrel's lines carry a connection id each.
                    throttle.Report(logLevel, $"{endPoint}: {eventId.Name ?? eventId.Id.ToString(CultureInfo.InvariantCulture)}", () => formatter(state, exception), exception);
                }
            }
        }
    }
}

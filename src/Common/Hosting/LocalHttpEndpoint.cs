using System.Net;
using System.Net.Sockets;
using System.Text;
using Microsoft.Extensions.Logging;
using NbdServer.Common.Logging;
using NbdServer.Common.Net;
using NbdServer.Common.Posix;

namespace NbdServer.Common.Hosting;

/// <summary>An answer of a <see cref="LocalHttpEndpoint"/>.</summary>
public readonly record struct LocalHttpResponse(string Status, string ContentType, byte[] Body)
{
    public static LocalHttpResponse NotFound(string hint) => Text("404 Not Found", hint);

    public static LocalHttpResponse MethodNotAllowed(string hint) => Text("405 Method Not Allowed", hint);

    public static LocalHttpResponse Text(string status, string text) => new(status, "text/plain", Encoding.UTF8.GetBytes(text + "\n"));
}

/// <summary>The parts of a request a <see cref="LocalHttpEndpoint"/> handler looks at; <paramref name="Query"/> is the raw text after '?', or empty.</summary>
public readonly record struct LocalHttpRequest(string Method, string Path, string Query = "");

/// <summary>Limits of the operator's local HTTP endpoints (control socket, metrics).</summary>
public sealed record LocalHttpLimits
{
    /// <summary>
    /// Requests served at once; more connections are closed at accept. Eight is plenty for a
    /// status watcher, a scrub command and a Prometheus scrape, and bounds what a local client that
    /// opens connections and never speaks can hold (a socket and a 4 KiB buffer each).
    /// </summary>
    public int MaxConnections { get; init; } = 8;

    /// <summary>
    /// Time one exchange may take: reading the request and sending the whole answer. A client
    /// that never sends, or never reads its answer, is dropped after this.
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
}

/// <summary>
/// The smallest HTTP/1.0 responder that serves the operator's local endpoints (status and scrub on
/// a Unix socket, Prometheus metrics on a loopback TCP port): one request per connection, the
/// request head read from at most 4 KiB, one deadline for the whole exchange (request and answer),
/// at most <see cref="LocalHttpLimits.MaxConnections"/> at once, one gather send for header and
/// body. On TCP the Host header must name a loopback address, <c>localhost</c> or the bound
/// address: a web page that rebinds its own DNS name to 127.0.0.1 sends its own name as Host and
/// is refused, so a browser can't be used to read the endpoint.
/// </summary>
/// <remarks>Refusals (over the cap, a bad request or Host) go to <c>throttle</c> when given: a storm is a summary.</remarks>
public sealed class LocalHttpEndpoint(EndPoint endPoint, Func<LocalHttpRequest, LocalHttpResponse> handle, LocalHttpLimits? limits = null, LogThrottle? throttle = null) : IAsyncDisposable
{
    /// <summary>
    /// A Unix socket's file mode: owner read/write only. Connecting needs write permission, so only
    /// the server's own user (and root) can ask for status or start a scrub.
    /// </summary>
    public const UnixFileMode SocketMode = UnixFileMode.UserRead | UnixFileMode.UserWrite;

    private const int MaxRequestBytes = 4096;
    private const int Backlog = 16;
    private static readonly byte[] EndOfHead = "\r\n\r\n"u8.ToArray();

    private readonly LocalHttpLimits _limits = limits ?? new LocalHttpLimits();
    private readonly CancellationTokenSource _stopping = new();
    private Socket? _socket;
    private Task? _loop;
    private string? _socketPath;
    private ulong _socketInode;
    private int _active;
    private long _refused;

    public EndPoint LocalEndPoint => _socket!.LocalEndPoint!;

    /// <summary>Connections closed at accept because <see cref="LocalHttpLimits.MaxConnections"/> were being served.</summary>
    public long Refused => Interlocked.Read(ref _refused);

    /// <summary>
    /// Listens on the end point. A Unix socket's file gets <see cref="SocketMode"/> (a stale one at
    /// the path is replaced, a live one refused) and is removed by <see cref="DisposeAsync"/>.
    /// </summary>
    public void Start()
    {
        _limits.Validate();
        if (endPoint is UnixDomainSocketEndPoint unix)
        {
            _socketPath = unix.ToString();
            (_socket, _socketInode) = UnixSocketFile.Listen(_socketPath, SocketMode, Backlog);
        }
        else
        {
            _socket = new Socket(endPoint.AddressFamily, SocketType.Stream, ProtocolType.Tcp);
            _socket.SetSocketOption(SocketOptionLevel.Socket, SocketOptionName.ReuseAddress, true);
            _socket.Bind(endPoint);
            _socket.Listen(Backlog);
        }
        _loop = AcceptLoop.RunAsync(_socket, Accepted, _stopping.Token);
    }

    private void Accepted(Socket client)
    {
        if (Interlocked.Increment(ref _active) > _limits.MaxConnections)
        {
            Interlocked.Decrement(ref _active);
            Interlocked.Increment(ref _refused);
            client.Dispose();
            throttle?.Report(LogLevel.Warning, $"{endPoint}: too many connections", () => $"{_limits.MaxConnections} requests already being served; closed another");
            return;
        }
        _ = AnswerAsync(client);
    }

    private async Task AnswerAsync(Socket client)
    {
        try
        {
            using (client)
            using (var deadline = CancellationTokenSource.CreateLinkedTokenSource(_stopping.Token))
            {
                deadline.CancelAfter(_limits.Timeout);
                try
                {
                    LocalHttpResponse response = await ReadRequestAsync(client, deadline.Token) is { } request
                        ? handle(request)
                        : LocalHttpResponse.Text("400 Bad Request", "bad request or Host");
                    byte[] header = Encoding.ASCII.GetBytes($"HTTP/1.0 {response.Status}\r\nContent-Type: {response.ContentType}\r\nContent-Length: {response.Body.Length}\r\nConnection: close\r\n\r\n");
                    int sent = 0;
                    int total = header.Length + response.Body.Length;
                    // SendAsync with a token: a client that never reads can hold us at most until the deadline.
                    while (sent < total)
                    {
                        sent += sent < header.Length
                            ? await client.SendAsync(header.AsMemory(sent), SocketFlags.None, deadline.Token)
                            : await client.SendAsync(response.Body.AsMemory(sent - header.Length), SocketFlags.None, deadline.Token);
                    }
                    client.Shutdown(SocketShutdown.Send);
                }
                catch (Exception e) when (e is OperationCanceledException or SocketException or ObjectDisposedException)
                {
                    // A client that went away, never sent a request or never read the answer: nothing more to do.
                }
            }
        }
        finally
        {
            Interlocked.Decrement(ref _active);
        }
    }

    /// <summary>The request line and Host check; null for a malformed request or a foreign Host.</summary>
    private async Task<LocalHttpRequest?> ReadRequestAsync(Socket client, CancellationToken cancel)
    {
        byte[] buffer = new byte[MaxRequestBytes];
        int received = 0;
        while (received < buffer.Length && buffer.AsSpan(0, received).IndexOf(EndOfHead) < 0)
        {
            int n = await client.ReceiveAsync(buffer.AsMemory(received), SocketFlags.None, cancel);
            if (n == 0)
            {
                break;
            }
            received += n;
        }
        int end = buffer.AsSpan(0, received).IndexOf(EndOfHead);
        if (end < 0)
        {
            throttle?.Report(LogLevel.Warning, $"{endPoint}: bad request", () => $"no complete request head in {received} bytes");
            return null;
        }
        string[] lines = Encoding.ASCII.GetString(buffer, 0, end).Split("\r\n");
        string[] requestLine = lines[0].Split(' ');
        if (requestLine.Length != 3 || !requestLine[2].StartsWith("HTTP/1.", StringComparison.Ordinal))
        {
            throttle?.Report(LogLevel.Warning, $"{endPoint}: bad request", () => "malformed request line");
            return null;
        }
        if (_socket!.LocalEndPoint is IPEndPoint bound)
        {
            string? host = lines.Skip(1)
                .Where(l => l.StartsWith("Host:", StringComparison.OrdinalIgnoreCase))
                .Select(l => l[5..].Trim())
                .SingleOrDefault();
            if (host is null || !IsLocalHost(host, bound))
            {
                // A browser tricked by DNS rebinding sends the attacker's name here.
                throttle?.Report(LogLevel.Warning, $"{endPoint}: foreign Host", () => $"refused a request with Host '{host}'");
                return null;
            }
        }
        string[] target = requestLine[1].Split('?', 2);
        return new LocalHttpRequest(requestLine[0], target[0], target.Length > 1 ? target[1] : "");
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
        await _stopping.CancelAsync();
        _socket?.Dispose();
        if (_loop is not null)
        {
            await _loop;
        }
        if (_socketPath is not null)
        {
            UnixSocketFile.Remove(_socketPath, _socketInode);
        }
        _stopping.Dispose();
    }
}

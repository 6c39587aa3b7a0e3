using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using NbdServer.Common.Hosting;
using NbdServer.Common.Posix;

namespace NbdServer.Common.Tests;

/// <summary>The operator's local HTTP endpoints: socket file handling, Host check, connection cap, deadline.</summary>
[TestFixture]
public sealed class LocalHttpEndpointTests
{
    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-http-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private string SocketPath => Path.Combine(_dir, "c.sock");

    private static LocalHttpResponse Hello(LocalHttpRequest request) => LocalHttpResponse.Text("200 OK", $"{request.Method} {request.Path}");

    [Test]
    [CancelAfter(10_000)]
    public async Task Unix_socket_is_mode_0600_owned_by_the_server_user_and_removed_at_dispose()
    {
        var endpoint = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello);
        endpoint.Start();
        PosixFileStatus status = UnixSocketFile.Stat(SocketPath)!.Value;
        uint ourUid = UnixSocketFile.Stat(_dir)!.Value.Uid;
        await endpoint.DisposeAsync();

        Assert.That((status.IsSocket, status.Mode, status.Uid), Is.EqualTo((true, UnixFileMode.UserRead | UnixFileMode.UserWrite, ourUid)));
        Assert.That(File.Exists(SocketPath), Is.False);
        Assert.That(Directory.GetFileSystemEntries(_dir), Is.Empty, "the staging directory was left behind");
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task Unix_socket_answers_a_request()
    {
        await using var endpoint = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello);
        endpoint.Start();

        string answer = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "POST /scrub HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n");

        Assert.That(answer, Does.StartWith("HTTP/1.0 200 OK").And.EndWith("POST /scrub\n"));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_stale_socket_file_is_replaced()
    {
        // A killed server's socket: .NET unlinks the path it bound on Dispose, so bind elsewhere and rename.
        using (var dead = new Socket(AddressFamily.Unix, SocketType.Stream, ProtocolType.Unspecified))
        {
            dead.Bind(new UnixDomainSocketEndPoint(SocketPath + ".old"));
            File.Move(SocketPath + ".old", SocketPath);
        }
        Assert.That(UnixSocketFile.Stat(SocketPath)?.IsSocket, Is.True, "setup: a socket file nobody listens on");

        await using var endpoint = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello);
        endpoint.Start();

        Assert.That(await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET /status HTTP/1.0\r\n\r\n"), Does.StartWith("HTTP/1.0 200 OK"));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_live_socket_is_not_taken_over()
    {
        await using var first = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello);
        first.Start();
        await using var second = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello);

        Assert.That(second.Start, Throws.InstanceOf<IOException>().With.Message.Contains("in use"));
        Assert.That(await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET / HTTP/1.0\r\n\r\n"), Does.StartWith("HTTP/1.0 200 OK"));
    }

    [Test]
    public async Task A_regular_file_at_the_socket_path_is_not_deleted()
    {
        await File.WriteAllTextAsync(SocketPath, "precious");
        await using var endpoint = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello);

        Assert.That(endpoint.Start, Throws.InstanceOf<IOException>().With.Message.Contains("not a socket"));
        Assert.That(await File.ReadAllTextAsync(SocketPath), Is.EqualTo("precious"));
    }

    [TestCase("localhost")]
    [TestCase("localhost:9810")]
    [TestCase("127.0.0.1:9810")]
    [TestCase("127.0.0.2")]
    [TestCase("[::1]:9810")]
    public void Loopback_hosts_are_local(string host) =>
        Assert.That(LocalHttpEndpoint.IsLocalHost(host, new IPEndPoint(IPAddress.Loopback, 9810)), Is.True);

    [TestCase("evil.example")]
    [TestCase("evil.example:9810")]
    [TestCase("localhost.evil.example")]
    [TestCase("10.0.0.5:9810")]
    [TestCase("")]
    [TestCase("[::1")]
    public void Other_hosts_are_not_local_on_a_loopback_bind(string host) =>
        Assert.That(LocalHttpEndpoint.IsLocalHost(host, new IPEndPoint(IPAddress.Loopback, 9810)), Is.False);

    [Test]
    public void The_bound_address_is_local() =>
        Assert.That(LocalHttpEndpoint.IsLocalHost("10.0.0.5:9810", new IPEndPoint(IPAddress.Parse("10.0.0.5"), 9810)), Is.True);

    [Test]
    [CancelAfter(10_000)]
    public async Task Metrics_answer_only_GET_metrics_to_a_local_host()
    {
        using var exporter = new PrometheusExporter(_ => false);
        await using var metrics = new MetricsEndpoint(new IPEndPoint(IPAddress.Loopback, 0), exporter);
        metrics.Start();
        IPEndPoint at = metrics.LocalEndPoint;

        string ok = await ExchangeAsync(at, $"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{at.Port}\r\n\r\n");
        string rebound = await ExchangeAsync(at, "GET /metrics HTTP/1.1\r\nHost: attacker.example\r\n\r\n");
        string noHost = await ExchangeAsync(at, "GET /metrics HTTP/1.0\r\n\r\n");
        string post = await ExchangeAsync(at, "POST /metrics HTTP/1.1\r\nHost: localhost\r\n\r\n");
        string other = await ExchangeAsync(at, "GET /status HTTP/1.1\r\nHost: localhost\r\n\r\n");

        Assert.That(ok, Does.StartWith("HTTP/1.0 200 OK"));
        Assert.That(rebound, Does.StartWith("HTTP/1.0 400 "));
        Assert.That(noHost, Does.StartWith("HTTP/1.0 400 "));
        Assert.That(post, Does.StartWith("HTTP/1.0 405 "));
        Assert.That(other, Does.StartWith("HTTP/1.0 404 "));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_storm_of_foreign_Host_requests_is_logged_once_with_the_Host()
    {
        var logger = new LinesLogger();
        using var throttle = new NbdServer.Common.Logging.LogThrottle(logger, TimeSpan.FromHours(1));
        using var exporter = new PrometheusExporter(_ => false);
        await using var metrics = new MetricsEndpoint(new IPEndPoint(IPAddress.Loopback, 0), exporter, null, throttle);
        metrics.Start();

        for (int i = 0; i < 20; i++)
        {
            Assert.That(await ExchangeAsync(metrics.LocalEndPoint, "GET /metrics HTTP/1.1\r\nHost: rebound.example\r\n\r\n"), Does.StartWith("HTTP/1.0 400 "));
        }

        Assert.That(logger.Lines, Has.Count.EqualTo(1));
        Assert.That(logger.Lines[0], Does.Contain("rebound.example"));
    }

    private sealed class LinesLogger : Microsoft.Extensions.Logging.ILogger
    {
        private readonly List<string> _lines = [];

        public List<string> Lines
        {
            get
            {
                lock (_lines)
                {
                    return [.. _lines];
                }
            }
        }

        public IDisposable? BeginScope<TState>(TState state) where TState : notnull => null;

        public bool IsEnabled(Microsoft.Extensions.Logging.LogLevel logLevel) => true;

        public void Log<TState>(Microsoft.Extensions.Logging.LogLevel logLevel, Microsoft.Extensions.Logging.EventId eventId, TState state, Exception? exception, Func<TState, Exception?, string> formatter)
        {
            lock (_lines)
            {
                _lines.Add(formatter(state, exception));
            }
        }
    }

    [Test]
    [CancelAfter(20_000)]
    public async Task Clients_that_never_send_hold_a_slot_only_until_the_deadline()
    {
        var limits = new LocalHttpLimits { MaxConnections = 2, Timeout = TimeSpan.FromSeconds(1) };
        await using var endpoint = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello, limits);
        endpoint.Start();
        using Socket idle1 = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        using Socket idle2 = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        await Task.Delay(100);

        // Over the cap: closed at once, not queued behind the silent ones.
        string refused = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET / HTTP/1.0\r\n\r\n");
        var clock = Stopwatch.StartNew();
        string served = await RetryUntilServedAsync(new UnixDomainSocketEndPoint(SocketPath), TimeSpan.FromSeconds(5));

        Assert.That(refused, Is.Empty);
        Assert.That(endpoint.Refused, Is.GreaterThanOrEqualTo(1));
        Assert.That(served, Does.StartWith("HTTP/1.0 200 OK"));
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3)), "the silent clients' slots outlived the deadline");
    }

    [Test]
    [CancelAfter(20_000)]
    public async Task A_client_that_never_reads_its_answer_is_dropped_at_the_deadline()
    {
        // 64 MiB answer: far more than the socket buffers hold, so the send blocks on the client.
        byte[] big = new byte[64 << 20];
        var limits = new LocalHttpLimits { MaxConnections = 1, Timeout = TimeSpan.FromSeconds(1) };
        await using var endpoint = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath),
            r => r.Path == "/big" ? new LocalHttpResponse("200 OK", "application/octet-stream", big) : Hello(r), limits);
        endpoint.Start();
        using Socket sink = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        await sink.SendAsync("GET /big HTTP/1.0\r\n\r\n"u8.ToArray(), SocketFlags.None);
        await Task.Delay(200);

        string served = await RetryUntilServedAsync(new UnixDomainSocketEndPoint(SocketPath), TimeSpan.FromSeconds(5));

        Assert.That(served, Does.StartWith("HTTP/1.0 200 OK").And.EndWith("GET /\n"));
    }

    private static async Task<string> RetryUntilServedAsync(EndPoint at, TimeSpan within)
    {
        var clock = Stopwatch.StartNew();
        while (true)
        {
            string answer = await ExchangeAsync(at, "GET / HTTP/1.0\r\n\r\n");
            if (answer.Length > 0 || clock.Elapsed > within)
            {
                return answer;
            }
            await Task.Delay(100);
        }
    }

    private static async Task<Socket> ConnectAsync(EndPoint at)
    {
        var socket = new Socket(at.AddressFamily, SocketType.Stream, at is UnixDomainSocketEndPoint ? ProtocolType.Unspecified : ProtocolType.Tcp);
        await socket.ConnectAsync(at);
        return socket;
    }

    /// <summary>Sends <paramref name="request"/>, reads to EOF; "" when the server closed without answering.</summary>
    private static async Task<string> ExchangeAsync(EndPoint at, string request)
    {
        using Socket socket = await ConnectAsync(at);
        using var cancel = new CancellationTokenSource(TimeSpan.FromSeconds(5));
        var answer = new MemoryStream();
        try
        {
            await socket.SendAsync(Encoding.ASCII.GetBytes(request), SocketFlags.None, cancel.Token);
            byte[] buffer = new byte[4096];
            int n;
            while ((n = await socket.ReceiveAsync(buffer, SocketFlags.None, cancel.Token)) > 0)
            {
                answer.Write(buffer, 0, n);
            }
        }
        catch (SocketException)
        {
            // Reset by a server that refused us: whatever arrived is the answer.
        }
        return Encoding.ASCII.GetString(answer.ToArray());
    }
}

using System.Diagnostics;
using System.Net;
using System.Net.Sockets;
using System.Text;
using Microsoft.AspNetCore.Builder;
using Microsoft.AspNetCore.Http;
using Microsoft.AspNetCore.Routing;
using NbdServer.Common.Hosting;
using NbdServer.Common.Posix;

namespace NbdServer.Common.Tests;

/// <summary>The operator's local HTTP endpoints (Kestrel): socket file handling, Host check, connection cap, deadlines, body limit, bad requests.</summary>
[TestFixture]
public sealed class LocalHttpEndpointTests
{
    private string _dir = null!;

    [SetUp]
    public void SetUp()
    {
        _dir = Directory.CreateTempSubdirectory("nbd-http-").FullName;
        _hellos = 0;
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private string SocketPath => Path.Combine(_dir, "c.sock");

    private int _hellos;

    /// <summary>Every path, every method: answers "METHOD /path" and counts the calls.</summary>
    private void Hello(IEndpointRouteBuilder app) =>
        app.Map("/{**path}", context =>
        {
            Interlocked.Increment(ref _hellos);
            return LocalHttpResponse.Text(200, $"{context.Request.Method} {context.Request.Path}").ExecuteAsync(context);
        });

    private LocalHttpEndpoint UnixEndpoint(LocalHttpLimits? limits = null, Action<IEndpointRouteBuilder>? routes = null) =>
        new(new UnixDomainSocketEndPoint(SocketPath), routes ?? Hello, limits);

    [Test]
    [CancelAfter(10_000)]
    public async Task Unix_socket_is_mode_0600_owned_by_the_server_user_and_removed_at_dispose()
    {
        var endpoint = UnixEndpoint();
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
        await using var endpoint = UnixEndpoint();
        endpoint.Start();

        string answer = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "POST /scrub HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");

        Assert.That(answer, Does.StartWith("HTTP/1.1 200 OK").And.EndWith("POST /scrub\n"));
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

        await using var endpoint = UnixEndpoint();
        endpoint.Start();

        Assert.That(await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET /status HTTP/1.0\r\n\r\n"), Does.StartWith("HTTP/1.1 200 OK"));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_live_socket_is_not_taken_over()
    {
        await using var first = UnixEndpoint();
        first.Start();
        await using var second = UnixEndpoint();

        Assert.That(second.Start, Throws.InstanceOf<IOException>().With.Message.Contains("in use"));
        Assert.That(await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET / HTTP/1.0\r\n\r\n"), Does.StartWith("HTTP/1.1 200 OK"));
    }

    [Test]
    public async Task A_regular_file_at_the_socket_path_is_not_deleted()
    {
        await File.WriteAllTextAsync(SocketPath, "precious");
        await using var endpoint = UnixEndpoint();

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
        await using var metrics = new MetricsEndpoint(new IPEndPoint(IPAddress.Loopback, 0), meters: ["NbdServer.Tests.None"]);
        await metrics.StartAsync();
        IPEndPoint at = metrics.LocalEndPoint;

        string ok = await ExchangeAsync(at, $"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1:{at.Port}\r\nConnection: close\r\n\r\n");
        string rebound = await ExchangeAsync(at, "GET /metrics HTTP/1.1\r\nHost: attacker.example\r\nConnection: close\r\n\r\n");
        string noHost = await ExchangeAsync(at, "GET /metrics HTTP/1.0\r\n\r\n");
        string post = await ExchangeAsync(at, "POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\nConnection: close\r\n\r\n");
        string other = await ExchangeAsync(at, "GET /status HTTP/1.1\r\nHost: localhost\r\nConnection: close\r\n\r\n");

        Assert.That(at.Port, Is.Not.Zero);
        Assert.That(ok, Does.StartWith("HTTP/1.1 200 OK").And.Contain("Content-Type: text/plain; version=0.0.4"));
        Assert.That(rebound, Does.StartWith("HTTP/1.1 400 "));
        Assert.That(noHost, Does.StartWith("HTTP/1.1 400 "));
        Assert.That(post, Does.StartWith("HTTP/1.1 405 "));
        Assert.That(other, Does.StartWith("HTTP/1.1 404 ").And.Contain("try GET /metrics"));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_storm_of_foreign_Host_requests_is_logged_once_with_the_Host()
    {
        var logger = new LinesLogger();
        using var throttle = new NbdServer.Common.Logging.LogThrottle(logger, TimeSpan.FromHours(1));
        await using var metrics = new MetricsEndpoint(new IPEndPoint(IPAddress.Loopback, 0), null, throttle, ["NbdServer.Tests.None"]);
        await metrics.StartAsync();

        for (int i = 0; i < 20; i++)
        {
            Assert.That(await ExchangeAsync(metrics.LocalEndPoint, "GET /metrics HTTP/1.1\r\nHost: rebound.example\r\nConnection: close\r\n\r\n"), Does.StartWith("HTTP/1.1 400 "));
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
        await using LocalHttpEndpoint endpoint = UnixEndpoint(limits);
        endpoint.Start();
        using Socket idle1 = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        using Socket idle2 = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        await Task.Delay(100);

        // Over the cap: closed at once, not queued behind the silent ones.
        string refused = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET / HTTP/1.0\r\n\r\n");
        var clock = Stopwatch.StartNew();
        string served = await RetryUntilServedAsync(new UnixDomainSocketEndPoint(SocketPath), TimeSpan.FromSeconds(5));

        Assert.That(refused, Is.Empty);
        Assert.That(served, Does.StartWith("HTTP/1.1 200 OK"));
        // Kestrel looks at its deadlines once a second: 1 s of timeout is up to 2 s.
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(3.5)), "the silent clients' slots outlived the deadline");
    }

    [Test]
    [CancelAfter(20_000)]
    public async Task A_client_that_never_reads_its_answer_is_dropped_at_the_deadline()
    {
        // 64 MiB answer: far more than the socket buffers hold, so the send blocks on the client.
        byte[] big = new byte[64 << 20];
        var limits = new LocalHttpLimits { MaxConnections = 1, Timeout = TimeSpan.FromSeconds(1) };
        await using LocalHttpEndpoint endpoint = UnixEndpoint(limits, app =>
        {
            app.MapGet("/big", async context =>
            {
                // Written as a streamed answer would be: Kestrel times each write by its size.
                for (int offset = 0; offset < big.Length; offset += 64 << 10)
                {
                    await context.Response.Body.WriteAsync(big.AsMemory(offset, 64 << 10), context.RequestAborted);
                }
            });
            Hello(app);
        });
        endpoint.Start();
        using Socket sink = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        await sink.SendAsync("GET /big HTTP/1.0\r\n\r\n"u8.ToArray(), SocketFlags.None);
        await Task.Delay(200);

        string served = await RetryUntilServedAsync(new UnixDomainSocketEndPoint(SocketPath), TimeSpan.FromSeconds(5));

        Assert.That(served, Does.StartWith("HTTP/1.1 200 OK").And.EndWith("GET /\n"));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_body_over_the_limit_is_refused_with_413_before_the_route_runs_and_the_endpoint_serves_on()
    {
        await using LocalHttpEndpoint endpoint = UnixEndpoint();
        endpoint.Start();
        string big = new('x', LocalHttpLimits.MaxRequestBodyBytes + 1);

        string declared = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), $"POST /scrub HTTP/1.1\r\nHost: localhost\r\nContent-Length: {big.Length}\r\nConnection: close\r\n\r\n{big}");
        string chunked = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), $"POST /scrub HTTP/1.1\r\nHost: localhost\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n{big.Length:x}\r\n{big}\r\n0\r\n\r\n");
        string after = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET /status HTTP/1.0\r\n\r\n");

        Assert.That(declared, Does.StartWith("HTTP/1.1 413 "));
        Assert.That(chunked, Does.StartWith("HTTP/1.1 413 "));
        Assert.That(_hellos, Is.EqualTo(1), "only the last request reached a route");
        Assert.That(after, Does.StartWith("HTTP/1.1 200 OK"));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_body_within_the_limit_reaches_the_route_whole()
    {
        await using LocalHttpEndpoint endpoint = UnixEndpoint(routes: app => app.MapPost("/echo", async context =>
        {
            string body = await new StreamReader(context.Request.Body).ReadToEndAsync(context.RequestAborted);
            await LocalHttpResponse.Text(200, $"got {body.Length}").ExecuteAsync(context);
        }));
        endpoint.Start();
        string body = new('y', LocalHttpLimits.MaxRequestBodyBytes);

        string answer = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), $"POST /echo HTTP/1.1\r\nHost: localhost\r\nContent-Length: {body.Length}\r\nConnection: close\r\n\r\n{body}");

        Assert.That(answer, Does.StartWith("HTTP/1.1 200 OK").And.EndWith($"got {LocalHttpLimits.MaxRequestBodyBytes}\n"));
    }

    [TestCase("GARBAGE\r\n\r\n")]
    [TestCase("GET /status HTTP/9.9\r\n\r\n")]
    [TestCase("GET /status HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n")]
    [TestCase("GET /status HTTP/1.1\r\nHost: localhost\r\nX-Long: {long}\r\n\r\n")]
    [CancelAfter(10_000)]
    public async Task A_malformed_or_oversized_request_is_answered_with_an_error_and_the_endpoint_serves_on(string request)
    {
        await using LocalHttpEndpoint endpoint = UnixEndpoint();
        endpoint.Start();

        string refused = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), request.Replace("{long}", new string('z', LocalHttpLimits.MaxRequestHeadersBytes), StringComparison.Ordinal));
        string after = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET /status HTTP/1.0\r\n\r\n");

        Assert.That(refused, Does.Match("^HTTP/1.1 [45][0-9][0-9] "), "a 4xx, or 505 for an HTTP version it does not speak");
        Assert.That(_hellos, Is.EqualTo(1));
        Assert.That(after, Does.StartWith("HTTP/1.1 200 OK"));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task Connections_over_the_cap_are_closed_at_once_and_the_rest_are_served()
    {
        var limits = new LocalHttpLimits { MaxConnections = 1, Timeout = TimeSpan.FromSeconds(5) };
        await using LocalHttpEndpoint endpoint = UnixEndpoint(limits);
        endpoint.Start();
        using Socket holder = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        await holder.SendAsync("GET /held HTTP/1.1\r\nHost: localhost\r\n\r\n"u8.ToArray(), SocketFlags.None);
        byte[] buffer = new byte[4096];
        int n = await holder.ReceiveAsync(buffer, SocketFlags.None);

        var clock = Stopwatch.StartNew();
        string refused = await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET / HTTP/1.0\r\n\r\n");

        Assert.That(Encoding.ASCII.GetString(buffer, 0, n), Does.StartWith("HTTP/1.1 200 OK"), "the kept-alive connection holds the only slot");
        Assert.That(refused, Is.Empty);
        Assert.That(clock.Elapsed, Is.LessThan(TimeSpan.FromSeconds(2)), "refused at once, not queued");
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_storm_of_connections_over_the_cap_is_logged_once()
    {
        var logger = new LinesLogger();
        using var throttle = new NbdServer.Common.Logging.LogThrottle(logger, TimeSpan.FromHours(1));
        await using var endpoint = new LocalHttpEndpoint(new UnixDomainSocketEndPoint(SocketPath), Hello, new LocalHttpLimits { MaxConnections = 1 }, throttle);
        endpoint.Start();
        using Socket holder = await ConnectAsync(new UnixDomainSocketEndPoint(SocketPath));
        await holder.SendAsync("GET /held HTTP/1.1\r\nHost: localhost\r\n\r\n"u8.ToArray(), SocketFlags.None);
        Assert.That(await holder.ReceiveAsync(new byte[4096], SocketFlags.None), Is.Positive, "setup: the holder was served and keeps its connection");

        for (int i = 0; i < 20; i++)
        {
            Assert.That(await ExchangeAsync(new UnixDomainSocketEndPoint(SocketPath), "GET / HTTP/1.0\r\n\r\n"), Is.Empty);
        }

        Assert.That(logger.Lines, Has.Count.EqualTo(1));
        Assert.That(logger.Lines[0], Does.Contain("maximum number of concurrent connections"));
        Assert.That(throttle.TotalReported, Is.EqualTo(20));
    }

    [Test]
    [CancelAfter(10_000)]
    public async Task A_scrape_is_valid_Prometheus_text_with_the_names_types_and_buckets_of_our_instruments()
    {
        string meterName = $"NbdServer.Tests.Scrape{Guid.NewGuid():N}";
        await using var metrics = new MetricsEndpoint(new IPEndPoint(IPAddress.Loopback, 0), meters: [meterName]);
        await metrics.StartAsync();
        using var meter = new System.Diagnostics.Metrics.Meter(meterName);
        meter.CreateCounter<long>("nbd.test.requests", "{request}", "Requests").Add(3, new KeyValuePair<string, object?>("command", "read"));
        meter.CreateCounter<long>("nbd.test.read", "By").Add(4096);
        meter.CreateUpDownCounter<long>("nbd.test.connections", "{connection}").Add(2);
        meter.CreateObservableGauge("nbd.test.state", () => 1, null, "a state with \"quotes\" in its help");
        System.Diagnostics.Metrics.Histogram<double> duration = meter.CreateHistogram<double>("nbd.test.duration", "s");
        foreach (double seconds in new[] { 0.00004, 0.0002, 0.003, 20 })
        {
            duration.Record(seconds, new KeyValuePair<string, object?>("command", "write"));
        }

        using var http = new HttpClient();
        string text = await http.GetStringAsync(new Uri($"http://127.0.0.1:{metrics.LocalEndPoint.Port}/metrics"));
        IReadOnlyDictionary<string, NbdServer.Tests.Shared.PrometheusText.Family> families = NbdServer.Tests.Shared.PrometheusText.Parse(text);

        Assert.That(families.Where(f => f.Key.StartsWith("nbd_test_", StringComparison.Ordinal)).ToDictionary(f => f.Key, f => f.Value.Type), Is.EquivalentTo(new Dictionary<string, string?>
        {
            ["nbd_test_requests_total"] = "counter",
            ["nbd_test_read_bytes_total"] = "counter",
            ["nbd_test_connections"] = "gauge",
            ["nbd_test_state"] = "gauge",
            ["nbd_test_duration_seconds"] = "histogram",
        }));
        NbdServer.Tests.Shared.PrometheusText.Sample requests = families["nbd_test_requests_total"].Samples.Single();
        Assert.That((requests.Labels["command"], requests.Value), Is.EqualTo(("read", 3.0)));
        Assert.That(families["nbd_test_read_bytes_total"].Samples.Single().Value, Is.EqualTo(4096));
        Assert.That(families["nbd_test_connections"].Samples.Single().Value, Is.EqualTo(2));
        var buckets = families["nbd_test_duration_seconds"].Samples.Where(s => s.Name.EndsWith("_bucket", StringComparison.Ordinal)).ToList();
        Assert.That(buckets.Select(b => NbdServer.Tests.Shared.PrometheusText.Number(b.Labels["le"])), Is.EqualTo(MetricsEndpoint.Buckets.Append(double.PositiveInfinity)));
        Assert.That(buckets.Select(b => b.Value).Take(3), Is.EqualTo(new[] { 1.0, 1.0, 2.0 }), "cumulative counts at 50 us, 100 us, 250 us");
        Assert.That(buckets[^2].Value, Is.EqualTo(3), "20 s is past the last bucket");
        Assert.That(families["nbd_test_duration_seconds"].Samples.Single(s => s.Name.EndsWith("_count", StringComparison.Ordinal)).Value, Is.EqualTo(4));
    }

    [Test]
    public void The_strict_parser_refuses_what_a_scraper_would()
    {
        string[] bad =
        [
            "no_newline 1",
            "1bad_name 1\n",
            "m{l=\"unterminated} 1\n",
            "m{l=\"v\",l=\"w\"} 1\n",
            "m 1\nm 2\n",
            "m one\n",
            "# TYPE m counter\n# TYPE m gauge\nm 1\n",
            "# TYPE a gauge\na 1\nb 1\na{x=\"y\"} 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 2\nh_bucket{le=\"+Inf\"} 1\nh_sum 1\nh_count 1\n",
            "# TYPE h histogram\nh_bucket{le=\"1\"} 1\nh_sum 1\nh_count 1\n",
        ];

        Assert.Multiple(() =>
        {
            foreach (string text in bad)
            {
                Assert.That(() => NbdServer.Tests.Shared.PrometheusText.Parse(text), Throws.InstanceOf<FormatException>(), text);
            }
            Assert.That(NbdServer.Tests.Shared.PrometheusText.Parse("# HELP m a \\ help\n# TYPE m counter\nm{a=\"x\\\"y\"} 1 1700000000\n")["m"].Samples.Single().Labels["a"], Is.EqualTo("x\"y"));
            Assert.That(NbdServer.Tests.Shared.PrometheusText.Parse("m{} 2\n")["m"].Samples.Single().Value, Is.EqualTo(2));
        });
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

using System.Net;
using NbdServer.Frontend.Qos;
using NbdServer.Frontend.Server;
using NbdServer.ReplicaEngine;

namespace NbdServer.Frontend.Tests;

/// <summary>QoS on the control socket (<c>GET/POST /qos</c>) and <c>nbd-server qos [set]</c>.</summary>
[TestFixture]
[CancelAfter(20_000)]
public sealed class QosControlTests
{
    private static readonly EngineStatus Status = new(7, 3, 1L << 30, 4096, 1024, 3, []);

    private static readonly QosLimits Configured = new() { ReadIops = 500, Burst = TimeSpan.FromSeconds(2) };

    private string _dir = null!;
    private QosLimiter _limiter = null!;
    private CapturingLogger _logger = null!;

    [SetUp]
    public void SetUp()
    {
        _dir = Directory.CreateTempSubdirectory("nbd-qos-").FullName;
        _limiter = new QosLimiter(Configured);
        _logger = new CapturingLogger();
    }

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private string SocketPath => Path.Combine(_dir, "control.sock");

    private ControlServer Start(bool replicated = true)
    {
        var qos = new QosControl([("vol0", _limiter)], _logger);
        var control = new ControlServer(SocketPath, replicated ? () => Status : null, qos: qos);
        control.Start();
        return control;
    }

    private IEnumerable<string> QosLogLines => _logger.Lines.Select(l => l.Message).Where(m => m.StartsWith("QoS", StringComparison.Ordinal));

    [Test]
    public async Task Qos_GET_answers_each_exports_limits_and_counts_as_JSON()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        string body = await http.GetStringAsync(new Uri("http://localhost/qos"));

        Assert.That(body, Does.Contain("\"export\": \"vol0\"").And.Contain("\"readIops\": 500").And.Contain("\"burstSeconds\": 2").And.Contain("\"throttledRequests\": 0"));
    }

    [TestCase("read-iops=1000&write-mbps=20.5", 1000.0, 20.5, 2.0)]
    [TestCase("read-iops=0", 0.0, 0.0, 2.0)]
    [TestCase("export=vol0&burst=0.25", 500.0, 0.0, 0.25)]
    public async Task Qos_POST_changes_only_the_limits_it_names_logs_once_and_answers_the_new_limits(string query, double readIops, double writeMbps, double burst)
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.PostAsync(new Uri($"http://localhost/qos?{query}"), null);
        string body = await response.Content.ReadAsStringAsync();

        Assert.That(response.IsSuccessStatusCode, Is.True, body);
        Assert.That(_limiter.Limits, Is.EqualTo(Configured with { ReadIops = readIops, WriteMbps = writeMbps, Burst = TimeSpan.FromSeconds(burst) }));
        Assert.That(body, Does.Contain($"\"burstSeconds\": {burst}"));
        Assert.That(QosLogLines, Has.Exactly(1).Items.And.All.StartsWith("QoS of export 'vol0' set: "));
    }

    [TestCase("", "nothing to set")]
    [TestCase("read-iops=fast", "read-iops: 'fast' is not a number")]
    [TestCase("read-iops=-5", "'-5' is not a number")]
    [TestCase("read-iops=1e3", "'1e3' is not a number")]
    [TestCase("read-iops=NaN", "'NaN' is not a number")]
    [TestCase("burst=Infinity", "'Infinity' is not a number")]
    [TestCase("speed=5", "'speed' is not a QoS setting")]
    [TestCase("read-iops=1&read-iops=2", "given twice")]
    [TestCase("export=vol0&export=vol0&read-iops=1", "'export' is given twice")]
    [TestCase("export=other&read-iops=1", "no export 'other'")]
    [TestCase("write-iops=100000001", "write-iops must be 0 (no limit) to 100000000")]
    [TestCase("total-mbps=2000000", "total-mbps must be 0 (no limit) to 1048576 MiB/s")]
    [TestCase("read-iops=100&burst=0", "burst must be 0.001 to 3600 seconds")]
    [TestCase("burst=7200", "burst must be 0.001 to 3600 seconds")]
    public async Task Qos_POST_with_a_bad_query_is_refused_with_400_and_the_reason_and_changes_nothing(string query, string reason)
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.PostAsync(new Uri($"http://localhost/qos?{query}"), null);
        string body = await response.Content.ReadAsStringAsync();

        Assert.That((int)response.StatusCode, Is.EqualTo(400), body);
        Assert.That(body, Does.Contain(reason));
        Assert.That(_limiter.Limits, Is.EqualTo(Configured));
        Assert.That(QosLogLines, Is.Empty);
    }

    [Test]
    public async Task A_DELETE_of_qos_is_refused_and_changes_nothing()
    {
        await using ControlServer control = Start();
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage response = await http.DeleteAsync(new Uri("http://localhost/qos?read-iops=1"));

        Assert.That(response.StatusCode, Is.EqualTo(HttpStatusCode.MethodNotAllowed));
        Assert.That(_limiter.Limits, Is.EqualTo(Configured));
    }

    [Test]
    public async Task A_server_without_a_replicated_volume_serves_qos_and_answers_404_for_the_engine_routes()
    {
        await using ControlServer control = Start(replicated: false);
        using HttpClient http = StatusCommand.Client(SocketPath);

        using HttpResponseMessage status = await http.GetAsync(new Uri("http://localhost/status"));
        using HttpResponseMessage scrub = await http.PostAsync(new Uri("http://localhost/scrub"), null);
        using HttpResponseMessage qos = await http.PostAsync(new Uri("http://localhost/qos?write-iops=50"), null);

        Assert.That((status.StatusCode, scrub.StatusCode, qos.StatusCode), Is.EqualTo((HttpStatusCode.NotFound, HttpStatusCode.NotFound, HttpStatusCode.OK)));
        Assert.That(_limiter.Limits.WriteIops, Is.EqualTo(50));
    }

    private static async Task<(int Code, string Output, string Errors)> RunAsync(Func<Task<int>> command)
    {
        TextWriter stdout = Console.Out, stderr = Console.Error;
        var output = new StringWriter();
        var errors = new StringWriter();
        Console.SetOut(output);
        Console.SetError(errors);
        try
        {
            return (await command(), output.ToString(), errors.ToString());
        }
        finally
        {
            Console.SetOut(stdout);
            Console.SetError(stderr);
        }
    }

    [Test]
    public async Task Qos_command_shows_the_limits_and_the_waits()
    {
        await using ControlServer control = Start();

        (int code, string output, _) = await RunAsync(() => QosCommand.RunAsync(["--control", SocketPath]));

        Assert.That(code, Is.Zero);
        Assert.That(output, Is.EqualTo("qos vol0: read 500 IOPS, burst 2 s; 0 requests waited 0 s in all, 0 waiting now\n"));
    }

    [Test]
    public async Task Qos_set_sends_the_limits_prints_them_and_exits_1_when_refused_2_on_bad_usage()
    {
        await using ControlServer control = Start();

        var set = await RunAsync(() => QosCommand.RunAsync(["set", "--control", SocketPath, "--read-iops", "0", "--write-mbps", "12.5", "--total-iops", "900"]));
        var refused = await RunAsync(() => QosCommand.RunAsync(["set", "--control", SocketPath, "--burst", "0"]));
        var notNumber = await RunAsync(() => QosCommand.RunAsync(["set", "--control", SocketPath, "--read-iops", "lots"]));
        var missing = await RunAsync(() => QosCommand.RunAsync(["set", "--control", SocketPath, "--write-iops"]));
        var unknown = await RunAsync(() => QosCommand.RunAsync(["set", "--control", SocketPath, "--speed", "5"]));
        var nothing = await RunAsync(() => QosCommand.RunAsync(["set", "--control", SocketPath]));
        var showWithLimit = await RunAsync(() => QosCommand.RunAsync(["--control", SocketPath, "--read-iops", "5"]));
        var tcp = await RunAsync(() => QosCommand.RunAsync(["--control", "127.0.0.1:10810"]));

        Assert.That((set.Code, refused.Code, notNumber.Code, missing.Code, unknown.Code, nothing.Code, showWithLimit.Code, tcp.Code), Is.EqualTo((0, 1, 2, 2, 2, 2, 2, 2)));
        Assert.That(_limiter.Limits, Is.EqualTo(Configured with { ReadIops = 0, WriteMbps = 12.5, TotalIops = 900 }));
        Assert.That(set.Output, Does.Contain("qos vol0: write 12.5 MiB/s, total 900 IOPS, burst 2 s"));
        Assert.That(refused.Errors, Does.Contain("refused: burst must be 0.001 to 3600 seconds"));
        Assert.That(notNumber.Errors, Does.Contain("'lots' is not a number"));
        Assert.That(nothing.Errors, Does.Contain("nothing to set"));
    }

    [Test]
    public async Task Qos_set_names_the_export_it_changes_and_an_unknown_one_is_refused()
    {
        await using ControlServer control = Start();

        var named = await RunAsync(() => QosCommand.RunAsync(["set", "--export", "vol0", "--read-mbps", "8", "--control", SocketPath]));
        var unknown = await RunAsync(() => QosCommand.RunAsync(["set", "--export", "vol9", "--read-mbps", "9", "--control", SocketPath]));

        Assert.That((named.Code, unknown.Code), Is.EqualTo((0, 1)));
        Assert.That(_limiter.Limits.ReadMbps, Is.EqualTo(8));
        Assert.That(unknown.Errors, Does.Contain("refused: no export 'vol9' (exports: vol0)"));
    }

    [Test]
    public async Task Qos_command_exits_1_when_no_server_answers()
    {
        (int code, _, string errors) = await RunAsync(() => QosCommand.RunAsync(["--control", SocketPath]));

        Assert.That(code, Is.EqualTo(1));
        Assert.That(errors, Does.Contain("no server answers"));
    }

    [Test]
    public async Task Status_command_shows_the_qos_under_the_replicas()
    {
        await using ControlServer control = Start();

        (int code, string output, _) = await RunAsync(() => StatusCommand.RunAsync(["--control", SocketPath]));

        Assert.That(code, Is.Zero);
        Assert.That(output, Does.Contain("generation 7").And.EndsWith("qos vol0: read 500 IOPS, burst 2 s; 0 requests waited 0 s in all, 0 waiting now\n"));
    }

    [Test]
    public async Task Status_command_of_a_file_server_shows_its_qos()
    {
        await using ControlServer control = Start(replicated: false);

        (int code, string output, _) = await RunAsync(() => StatusCommand.RunAsync(["--control", SocketPath]));

        Assert.That((code, output), Is.EqualTo((0, "qos vol0: read 500 IOPS, burst 2 s; 0 requests waited 0 s in all, 0 waiting now\n")));
    }

    [Test]
    public void Config_qos_settings_become_the_exports_starting_limits()
    {
        ServeCommand command = ServeCommand.Parse(["--qos-read-iops", "300", "--qos-write-mbps", "40", "--qos-total-iops", "400", "--qos-burst", "0.5"]);

        Assert.That(command.Frontend.ToQosLimits(), Is.EqualTo(new QosLimits { ReadIops = 300, WriteMbps = 40, TotalIops = 400, Burst = TimeSpan.FromSeconds(0.5) }));
    }

    [TestCase("--qos-read-iops", "-1", "--qos-read-iops: '-1' is not a number")]
    [TestCase("--qos-total-iops", "1000000000", "--qos-total-iops must be 0 (no limit) to 100000000")]
    [TestCase("--qos-write-mbps", "9999999", "--qos-write-mbps must be 0 (no limit) to 1048576 MiB/s")]
    [TestCase("--qos-burst", "0", "--qos-burst: '0' is not a positive number of seconds")]
    [TestCase("--qos-burst", "86400", "--qos-burst must be 0.001 to 3600 seconds")]
    public void A_bad_qos_setting_stops_the_start_with_a_message_naming_it(string option, string value, string message) =>
        Assert.That(() => ServeCommand.Parse([option, value]), Throws.ArgumentException.With.Message.Contains(message));
}

/// <summary>The QoS instruments of the frontend's meter: limits as gauges, waits as counters, per export.</summary>
public sealed class QosMetricsTests
{
    [Test]
    public void Each_exports_limits_and_waits_are_reported_with_its_name()
    {
        string name = $"metrics-{Guid.NewGuid():N}";
        var limiter = new QosLimiter(new QosLimits { WriteIops = 250, ReadMbps = 2 });
        var exports = new ExportRegistry([new NbdExport(name, new Volumes.MemoryVolume(1 << 20)) { Qos = limiter }]);
        var seen = new Dictionary<string, double>();
        using var listener = new System.Diagnostics.Metrics.MeterListener();
        listener.InstrumentPublished = (instrument, l) =>
        {
            if (instrument.Meter.Name == FrontendMetrics.MeterName && instrument.Name.StartsWith("nbd.frontend.qos.", StringComparison.Ordinal))
            {
                l.EnableMeasurementEvents(instrument);
            }
        };
        void Record(System.Diagnostics.Metrics.Instrument instrument, double value, ReadOnlySpan<KeyValuePair<string, object?>> tags)
        {
            string? export = null, direction = null;
            foreach (KeyValuePair<string, object?> tag in tags)
            {
                export = tag.Key == "export" ? (string?)tag.Value : export;
                direction = tag.Key == "direction" ? (string?)tag.Value : direction;
            }
            if (export == name)
            {
                seen[$"{instrument.Name}{(direction is null ? "" : "/" + direction)}"] = value;
            }
        }
        listener.SetMeasurementEventCallback<double>((i, v, t, _) => Record(i, v, t));
        listener.SetMeasurementEventCallback<long>((i, v, t, _) => Record(i, v, t));
        listener.Start();

        listener.RecordObservableInstruments();

        Assert.That(exports.All, Has.Count.EqualTo(1));
        Assert.That(seen, Does.ContainKey("nbd.frontend.qos.iops_limit/write").WithValue(250)
            .And.ContainKey("nbd.frontend.qos.iops_limit/read").WithValue(0)
            .And.ContainKey("nbd.frontend.qos.bandwidth_limit_bytes_per_second/read").WithValue(2 << 20)
            .And.ContainKey("nbd.frontend.qos.throttled_requests").WithValue(0)
            .And.ContainKey("nbd.frontend.qos.throttled_seconds").WithValue(0));
    }
}

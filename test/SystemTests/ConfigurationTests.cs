using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// Bad settings named at start by the real executables, from a file and from the environment (the
/// sources and their precedence in detail: NbdFrontend.Tests ConfigurationSourcesTests).
/// </summary>
[TestFixture]
[Category("Operations")]
public sealed partial class ConfigurationTests
{
    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-config-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    [Test]
    [CancelAfter(60_000)]
    public async Task Nbd_server_refuses_a_bad_limit_in_its_config_naming_setting_and_file()
    {
        string file = Write("""{"downstairs": "127.0.0.1:1,127.0.0.1:2,127.0.0.1:3", "max-outstanding-jobs": 5000}""");
        ExternalTool.Result result = await ExternalTool.RunAsync("dotnet", [Path.Combine(AppContext.BaseDirectory, "nbd-server.dll"), "--config", file], TimeSpan.FromSeconds(30));
        Assert.That(result.ExitCode, Is.EqualTo(2), result.ToString());
        Assert.That(result.Error, Does.Contain("--max-outstanding-jobs must be 1..1000").And.Contain(file));
        Assert.That(result.Error.Trim(), Does.Not.Contain('\n'), "one line");
    }

    [Test]
    [CancelAfter(60_000)]
    public async Task Nbd_server_refuses_an_unknown_environment_variable_naming_it()
    {
        var info = new System.Diagnostics.ProcessStartInfo("dotnet") { RedirectStandardError = true, RedirectStandardOutput = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "nbd-server.dll"));
        info.Environment["NBD_SERVER_MAX_OUTSTANDING_JOB"] = "5";
        using var process = System.Diagnostics.Process.Start(info)!;
        string error = await process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync();
        Assert.That(process.ExitCode, Is.EqualTo(2), error);
        Assert.That(error, Does.Contain("NBD_SERVER_MAX_OUTSTANDING_JOB").And.Contain("no setting"));
    }

    [Test]
    [CancelAfter(60_000)]
    public async Task Nbd_downstairs_refuses_a_bad_setting_from_the_environment_naming_it()
    {
        var info = new System.Diagnostics.ProcessStartInfo("dotnet") { RedirectStandardError = true, RedirectStandardOutput = true };
        info.ArgumentList.Add(Path.Combine(AppContext.BaseDirectory, "nbd-downstairs.dll"));
        info.ArgumentList.Add("run");
        info.ArgumentList.Add("--data");
        info.ArgumentList.Add(_dir);
        info.Environment["NBD_DOWNSTAIRS_IO_THREADS"] = "0";
        using var process = System.Diagnostics.Process.Start(info)!;
        string error = await process.StandardError.ReadToEndAsync();
        await process.WaitForExitAsync();
        Assert.That(process.ExitCode, Is.EqualTo(2), error);
        Assert.That(error, Does.Contain("--io-threads must be 1 to 256").And.Contain("NBD_DOWNSTAIRS_IO_THREADS"));
    }

    private string Write(string json)
    {
        string path = Path.Combine(_dir, $"config-{Guid.NewGuid():N}.json");
        File.WriteAllText(path, json);
        return path;
    }
}

/// <summary>The frontend's meter on the Prometheus endpoint, and a storm of failing requests as a few log lines.</summary>
[TestFixture]
[Category("Operations")]
public sealed partial class FrontendOperationsTests
{
    [Test]
    [CancelAfter(120_000)]
    public async Task Metrics_endpoint_counts_requests_bytes_and_latency()
    {
        using NbdServerProcess server = await NbdServerProcess.StartAsync("--memory", "64MiB", "--metrics", "127.0.0.1:0");
        int metricsPort = int.Parse(MetricsLine().Match(await WaitForLogAsync(server, MetricsLine())).Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture);
        ExternalTool.Result io = await ExternalTool.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x11 0 1M", "-c", "read -P 0x11 0 1M", "-c", "flush", server.Uri()], TimeSpan.FromSeconds(60));
        Assert.That(io.ExitCode, Is.Zero, io.ToString());

        string text = await OperationsTests.ScrapeAsync(metricsPort);
        Assert.That(text, Does.Contain("# TYPE nbd_frontend_requests_total counter"));
        Assert.That(Value(text, "nbd_frontend_written_bytes_total"), Is.GreaterThanOrEqualTo(1 << 20));
        Assert.That(Value(text, "nbd_frontend_read_bytes_total"), Is.GreaterThanOrEqualTo(1 << 20));
        Assert.That(Value(text, "nbd_frontend_requests_total{command=\"flush\"}"), Is.GreaterThanOrEqualTo(1));
        Assert.That(text, Does.Contain("# TYPE nbd_frontend_request_duration_seconds histogram"));
        Assert.That(Value(text, "nbd_frontend_request_duration_seconds_count{command=\"write\"}"), Is.GreaterThanOrEqualTo(1));
        Assert.That(text, Does.Contain("nbd_frontend_request_duration_seconds_bucket{command=\"write\",le=\"+Inf\"}"));
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task A_storm_of_failing_requests_is_a_few_log_lines_with_a_count()
    {
        using NbdServerProcess server = await NbdServerProcess.StartAsync("--memory", "16MiB", "--read-only", "--log-interval", "1");
        // libnbd's strict mode would refuse writes to a read-only export itself: turn it off so 2000 reach the server.
        string script = $"""
            import nbd
            h = nbd.NBD()
            h.set_strict_mode(0)
            h.connect_uri("{server.Uri()}")
            failed = 0
            for i in range(2000):
                try:
                    h.pwrite(b"x" * 512, 0)
                except nbd.Error:
                    failed += 1
            print("failed", failed)
            h.shutdown()
            """;
        ExternalTool.Result result = await ExternalTool.RunAsync("/usr/bin/python3", ["-c", script], TimeSpan.FromSeconds(90));
        Assert.That(result.Output, Does.Contain("failed 2000"), result.ToString());
        string summary = await WaitForLogAsync(server, RepeatedLine());
        int lines = server.Log.Split('\n').Count(l => l.Contains("request failed: Write with EPERM", StringComparison.Ordinal));
        Assert.That(lines, Is.LessThanOrEqualTo(5), server.Log);
        Assert.That(summary, Does.Contain("repeated"));
    }

    private static async Task<string> WaitForLogAsync(NbdServerProcess server, Regex pattern)
    {
        for (int i = 0; i < 200; i++)
        {
            Match m = pattern.Match(server.Log);
            if (m.Success)
            {
                return m.Value;
            }
            await Task.Delay(100);
        }
        Assert.Fail($"no log line /{pattern}/:\n{server.Log}");
        return "";
    }

    private static double Value(string text, string series)
    {
        foreach (string line in text.Split('\n'))
        {
            // OpenTelemetry's exporter writes a series without labels as "name{} value".
            string unlabelled = series.EndsWith('}') ? series : series + "{}";
            foreach (string prefix in new[] { series + " ", unlabelled + " " })
            {
                if (line.StartsWith(prefix, StringComparison.Ordinal))
                {
                    return double.Parse(line[prefix.Length..], System.Globalization.CultureInfo.InvariantCulture);
                }
            }
        }
        Assert.Fail($"no series {series} in:\n{text}");
        return 0;
    }

    [GeneratedRegex(@"metrics on http://127\.0\.0\.1:(\d+)/metrics")]
    private static partial Regex MetricsLine();

    [GeneratedRegex(@"request failed: Write with EPERM: repeated [\d,]+ times")]
    private static partial Regex RepeatedLine();
}

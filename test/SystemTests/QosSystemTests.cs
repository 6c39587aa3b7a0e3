using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// QoS end to end: a real server limited from its command line slows a real client without an
/// error, <c>nbd-server qos set</c> changes the limit live, and status and metrics show it.
/// </summary>
[TestFixture]
[CancelAfter(120_000)]
public sealed partial class QosSystemTests
{
    private const string QemuIo = "/usr/bin/qemu-io";

    private string _dir = null!;

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-qos-").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private static Task<ExternalTool.Result> NbdServerAsync(params string[] args) =>
        ExternalTool.RunAsync("dotnet", [Path.Combine(AppContext.BaseDirectory, "nbd-server.dll"), .. args], TimeSpan.FromSeconds(30));

    [Test]
    public async Task A_limited_memory_export_slows_qemu_io_without_an_error_and_qos_set_lifts_the_limit_live()
    {
        RealClient.Require(QemuIo, "qemu-utils");
        string control = Path.Combine(_dir, "control.sock");
        // 20 writes a second, a bucket of two: ten writes in a row take at least 0.4 s.
        using var server = await NbdServerProcess.StartAsync("--memory", "64M", "--control", control, "--metrics", "127.0.0.1:0",
            "--qos-write-iops", "20", "--qos-burst", "0.1");
        string[] writes = [.. Enumerable.Range(0, 10).SelectMany(i => new[] { "-c", $"write -P 0x{i + 1:x2} {i * 4096} 4k" })];

        var clock = Stopwatch.StartNew();
        ExternalTool.Result limited = await RealClient.RunAsync(QemuIo, ["-f", "raw", .. writes, server.Uri()], TimeSpan.FromSeconds(60));
        TimeSpan slowed = clock.Elapsed;
        ExternalTool.Result shown = await NbdServerAsync("qos", "--control", control);
        ExternalTool.Result lifted = await NbdServerAsync("qos", "set", "--control", control, "--write-iops", "0");
        clock.Restart();
        ExternalTool.Result free = await RealClient.RunAsync(QemuIo, ["-f", "raw", .. writes, "-c", "read -P 0x0a 36k 4k", server.Uri()], TimeSpan.FromSeconds(60));
        ExternalTool.Result status = await NbdServerAsync("status", "--control", control);
        int metricsPort = int.Parse(MetricsLine().Match(server.Log).Groups[1].Value, CultureInfo.InvariantCulture);
        string metrics = await OperationsTests.ScrapeAsync(metricsPort);

        Assert.That(limited.ExitCode, Is.Zero, limited.ToString());
        Assert.That(limited.Output + limited.Error, Does.Not.Contain("error").IgnoreCase);
        Assert.That(slowed, Is.GreaterThanOrEqualTo(TimeSpan.FromSeconds(0.35)), "ten writes at 20 a second from a bucket of two");
        Assert.That(shown.Output, Does.StartWith("qos vol0: write 20 IOPS, burst 0.1 s; "), shown.ToString());
        Assert.That(lifted.ExitCode, Is.Zero, lifted.ToString());
        Assert.That(lifted.Output, Does.StartWith("qos vol0: no limit; "), lifted.ToString());
        Assert.That(free.ExitCode, Is.Zero, free.ToString());
        Assert.That(status.Output, Does.StartWith("qos vol0: no limit; "), status.ToString());
        Assert.That(metrics, Does.Contain("nbd_frontend_qos_iops_limit{direction=\"write\",export=\"vol0\"} 0")
            .And.Match("nbd_frontend_qos_throttled_requests_total\\{export=\"vol0\"\\} ([89]|[1-9][0-9]+)\n"));
        Assert.That(server.Log, Does.Contain("QoS of export 'vol0' from the configuration: write 20 IOPS, burst 0.1 s")
            .And.Contain("QoS of export 'vol0' set: no limit"));
    }

    [GeneratedRegex(@"metrics on http://127\.0\.0\.1:(\d+)/metrics")]
    private static partial Regex MetricsLine();
}

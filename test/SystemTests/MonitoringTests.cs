using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// monitoring/: the alert rules pass promtool's check and their own unit tests, and every metric
/// the rules and the Grafana dashboard name is one the daemons really export (a rename would
/// otherwise leave an alert that never fires and a panel that stays empty).
/// </summary>
[TestFixture]
public sealed partial class MonitoringTests
{
    private static string Monitoring => Path.Combine(Repository.Root, "monitoring");

    private static string Rules => Path.Combine(Monitoring, "nbd-alerts.yml");

    private static string Dashboard => Path.Combine(Monitoring, "grafana-nbd.json");

    [Test]
    [CancelAfter(60_000)]
    public async Task Alert_rules_pass_promtool_check()
    {
        ExternalTool.Result r = await ExternalTool.RunAsync("promtool", ["check", "rules", Rules], TimeSpan.FromSeconds(30));

        Assert.That(r.ExitCode, Is.Zero, r.ToString());
        Assert.That(r.ToString(), Does.Contain("SUCCESS: 7 rules found"));
    }

    [Test]
    [CancelAfter(60_000)]
    public async Task Alert_rules_fire_on_their_unit_tests_series_and_stay_quiet_otherwise()
    {
        ExternalTool.Result r = await ExternalTool.RunAsync("promtool", ["test", "rules", Path.Combine(Monitoring, "nbd-alerts.test.yml")], TimeSpan.FromSeconds(30));

        Assert.That(r.ExitCode, Is.Zero, r.ToString());
        Assert.That(r.ToString(), Does.Contain("SUCCESS"));
    }

    [Test]
    public void Every_alert_rule_has_a_unit_test()
    {
        var rules = AlertName().Matches(File.ReadAllText(Rules)).Select(m => m.Groups[1].Value).ToHashSet();
        var tested = TestedAlert().Matches(File.ReadAllText(Path.Combine(Monitoring, "nbd-alerts.test.yml"))).Select(m => m.Groups[1].Value).ToHashSet();

        Assert.That(rules, Has.Count.EqualTo(7));
        Assert.That(tested, Is.EquivalentTo(rules));
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task Every_metric_the_rules_and_the_dashboard_name_is_exported_by_a_running_volume()
    {
        using ReplicatedVolumeFixture volume = await ReplicatedVolumeFixture.StartAsync("monitoring", 16L << 20, "--metrics", "127.0.0.1:0");
        DownstairsNode ds = volume.Downstairs[0];
        await ds.StopAsync(ReplicatedVolumeFixture.ProcessTimeout);
        await ds.StartAsync(["--metrics", "127.0.0.1:0"], ReplicatedVolumeFixture.ProcessTimeout);
        await volume.WaitForStatusAsync(s => s.InService == 3, TimeSpan.FromSeconds(60), "downstairs 0 back in service");
        ExternalTool.Result io = await ExternalTool.RunAsync("qemu-io", ["-f", "raw", "-c", "write -P 0x5a 0 1M", "-c", "read -P 0x5a 0 1M", "-c", "flush", volume.Upstairs!.Uri()], TimeSpan.FromSeconds(60));
        Assert.That(io.ExitCode, Is.Zero, io.ToString());

        string upstairs = await OperationsTests.ScrapeAsync(await MetricsPortAsync(() => volume.Upstairs!.Log));
        string downstairs = await OperationsTests.ScrapeAsync(await MetricsPortAsync(() => ds.Log));
        // Parsed strictly, as a scraper would: a malformed line fails here, not in Prometheus.
        var names = new[] { upstairs, downstairs }
            .SelectMany(text => NbdServer.Tests.Shared.PrometheusText.Parse(text).Values)
            .SelectMany(family => family.Samples.Select(sample => sample.Name))
            .ToHashSet();

        var wanted = new SortedSet<string>(StringComparer.Ordinal);
        wanted.UnionWith(MetricName().Matches(File.ReadAllText(Rules)).Select(m => m.Value));
        using (JsonDocument dashboard = JsonDocument.Parse(File.ReadAllText(Dashboard)))
        {
            foreach (JsonElement panel in dashboard.RootElement.GetProperty("panels").EnumerateArray())
            {
                foreach (JsonElement target in panel.GetProperty("targets").EnumerateArray())
                {
                    wanted.UnionWith(MetricName().Matches(target.GetProperty("expr").GetString()!).Select(m => m.Value));
                }
            }
        }

        Assert.That(wanted, Has.Count.GreaterThanOrEqualTo(15), "the rules and panels name the metrics they chart");
        Assert.That(wanted.Where(n => !names.Contains(n)), Is.Empty, $"named but not exported (exported: {string.Join(", ", names.Order())})");
    }

    private static async Task<int> MetricsPortAsync(Func<string> log)
    {
        for (int i = 0; i < 100; i++)
        {
            if (MetricsLine().Match(log()) is { Success: true } m)
            {
                return int.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture);
            }
            await Task.Delay(100);
        }
        Assert.Fail($"no metrics line in the log:\n{log()}");
        return 0;
    }

    [GeneratedRegex(@"- alert: (\w+)")]
    private static partial Regex AlertName();

    [GeneratedRegex(@"alertname: (\w+)")]
    private static partial Regex TestedAlert();

    /// <summary>Our metrics and the runtime's, as a PromQL expression names them.</summary>
    [GeneratedRegex(@"\b(?:nbd|dotnet)_[a-z_]+")]
    private static partial Regex MetricName();

    [GeneratedRegex(@"metrics on http://127\.0\.0\.1:(\d+)/metrics")]
    private static partial Regex MetricsLine();
}

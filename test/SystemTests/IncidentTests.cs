using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// Issue 5 / DESIGN §6: the incident scenarios (scripts/incident/*.sh) in their short mode
/// (INCIDENT_SHORT=1, 16 MiB regions), each against real processes: three nbd-downstairs, nbd-server
/// and the `nbd-verify` load. Each script prints one "INCIDENT key=value ..." line; the bars of
/// issue 5 are asserted here, one by one, so a failure names the figure that missed.
/// Needs root (tmpfs mount for the disk-full case), bash, python3 and curl.
/// </summary>
[TestFixture]
[Category("Incident")]
[NonParallelizable]
public sealed partial class IncidentTests
{
    private static readonly TimeSpan ScenarioTimeout = TimeSpan.FromSeconds(300);

    private static string Root => Repository.Root;

    private static async Task<Dictionary<string, string>> RunScenarioAsync(string name, bool tls = false)
    {
        var psi = new ProcessStartInfo("bash", [Path.Combine(Root, "scripts", "incident", name + ".sh")])
        {
            RedirectStandardOutput = true,
            RedirectStandardError = true,
            WorkingDirectory = Root,
        };
        psi.Environment["INCIDENT_SHORT"] = "1";
        psi.Environment["INCIDENT_SIZE"] = "16MiB";
        psi.Environment["INCIDENT_BIN_DIR"] = AppContext.BaseDirectory;
        if (tls)
        {
            psi.Environment["INCIDENT_TLS"] = "1";
        }
        using var p = Process.Start(psi)!;
        Task<string> stdout = p.StandardOutput.ReadToEndAsync();
        Task<string> stderr = p.StandardError.ReadToEndAsync();
        // A guard against a hung scenario, not a bar (the bars are the figures below; every wait in
        // the scripts is bounded). Twodown took 56-126 s on a loaded 2-CPU machine (sequential dotnet
        // start-ups: three region creates, three downstairs, two restarts, then repair, read-back,
        // compare and the picture), too close to the 150 s this used to be.
        using var timeout = new CancellationTokenSource(ScenarioTimeout);
        try
        {
            await p.WaitForExitAsync(timeout.Token);
        }
        catch (OperationCanceledException)
        {
            p.Kill(entireProcessTree: true);
            Assert.Fail($"{name}: scenario did not finish in {ScenarioTimeout.TotalSeconds:0} s\n{await stderr}");
        }
        string output = await stdout;
        string log = await stderr;
        TestContext.Out.WriteLine(output);
        TestContext.Out.WriteLine(log);
        Assert.That(p.ExitCode, Is.EqualTo(0), $"{name}: script failed\n{log}");
        string? line = output.Split('\n').LastOrDefault(l => l.StartsWith("INCIDENT ", StringComparison.Ordinal));
        Assert.That(line, Is.Not.Null, $"{name}: no INCIDENT summary line\n{output}\n{log}");
        return KeyValue().Matches(line!).ToDictionary(m => m.Groups[1].Value, m => m.Groups[2].Value);
    }

    [GeneratedRegex(@"(\w+)=(\S+)")]
    private static partial Regex KeyValue();

    private static double Num(Dictionary<string, string> f, string key) =>
        double.Parse(f[key], NumberStyles.Float, CultureInfo.InvariantCulture);

    /// <summary>"ds0:1.2,ds1:3,up:4" → the largest value.</summary>
    private static double MaxOf(Dictionary<string, string> f, string key) =>
        f[key].Split(',').Max(kv => double.Parse(kv.Split(':')[1], NumberStyles.Float, CultureInfo.InvariantCulture));

    private static void AssertData(Dictionary<string, string> f)
    {
        Assert.That(Num(f, "blocks_checked"), Is.GreaterThan(0), "verification ran");
        Assert.That(Num(f, "blocks_wrong"), Is.EqualTo(0), "no acknowledged (and flushed) write lost, nothing torn");
        Assert.That(f["regions_equal"], Is.EqualTo("yes"), "the three regions compare equal at the end");
    }

    /// <summary>The bars of scenarios 1-5: IO never stops, ≥ 50 % of the pre-fault median, &lt; 2 s latency, flat memory, quiet logs, fast recovery.</summary>
    private static void AssertFullBars(Dictionary<string, string> f)
    {
        Assert.Multiple(() =>
        {
            Assert.That(Num(f, "min_ios_fault"), Is.GreaterThan(0), "no second without completed IOs");
            Assert.That(Num(f, "min_ios_fault"), Is.GreaterThanOrEqualTo(0.5 * Num(f, "pre_median_ios")), "≥ 50 % of the pre-fault median in every second");
            Assert.That(Num(f, "max_lat_fault_ms"), Is.LessThan(2000), "longest single IO < 2 s");
            Assert.That(MaxOf(f, "rss_growth_mib"), Is.LessThan(64), "RSS growth of every process < 64 MiB");
            Assert.That(MaxOf(f, "log_lines"), Is.LessThan(100), "log lines of every process < 100");
            Assert.That(f["recovery_s"], Is.Not.EqualTo("never"), "full throughput comes back");
            // The 1 s recovery bar is judged by the full-length scripts (docs/reliability.md). In this short
            // run the pre-fault window is a few seconds after JIT warm-up on a shared 2-core machine, and
            // healthy seconds alone swing by a quarter: it is reported here, not asserted.
            TestContext.Out.WriteLine($"recovery_s={f["recovery_s"]} (bar < 1 s, judged by the full-length run)");
            Assert.That(f, Does.ContainKey("repair_s"), "replica back in service");
            AssertData(f);
        });
    }

    [Test]
    public async Task Disk_full_on_one_replica() => AssertFullBars(await RunScenarioAsync("diskfull"));

    [Test]
    public async Task Stuck_replica_SIGSTOP() => AssertFullBars(await RunScenarioAsync("stuck"));

    [Test]
    public async Task Dead_replica_SIGKILL_and_restart() => AssertFullBars(await RunScenarioAsync("dead"));

    [Test]
    public async Task Slow_replica_link() => AssertFullBars(await RunScenarioAsync("slow"));

    /// <summary>The same bars with mutual TLS on every upstairs ↔ downstairs link: the reconnect and the live repair go over TLS.</summary>
    [Test]
    public async Task Dead_replica_SIGKILL_and_restart_over_tls()
    {
        var f = await RunScenarioAsync("dead", tls: true);
        Assert.That(f.GetValueOrDefault("tls"), Is.EqualTo("1"), "the scenario ran with TLS on its links");
        AssertFullBars(f);
    }

    [Test]
    public async Task Rot_in_one_replica_is_read_around_and_repaired()
    {
        var f = await RunScenarioAsync("rot");
        Assert.That(Num(f, "flipped_blocks"), Is.GreaterThan(0), "rot was injected");
        AssertData(f);
    }

    [Test]
    public async Task Upstairs_crash_mid_write_reconciles()
    {
        var f = await RunScenarioAsync("upcrash");
        AssertData(f);
    }

    [Test]
    public async Task Two_replicas_down_writes_fail_in_bounded_time_reads_go_on()
    {
        var f = await RunScenarioAsync("twodown");
        Assert.Multiple(() =>
        {
            Assert.That(Num(f, "errors_fault"), Is.GreaterThan(0), "writes fail (EIO) while two are down");
            Assert.That(Num(f, "max_lat_fault_ms"), Is.LessThan(1000 * Num(f, "degraded_write_timeout_s") + 1500), "within the bounded wait");
            Assert.That(Num(f, "probe_reads_min_fault"), Is.GreaterThan(0), "reads go on every second");
            Assert.That(f["recovery_s"], Is.Not.EqualTo("never"), "service resumes without a restart");
            AssertData(f);
        });
    }
}

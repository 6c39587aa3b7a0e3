using System.Diagnostics;
using System.Globalization;

namespace NbdServer.Plot.Tests;

/// <summary>
/// scripts/incident/timeline.py, the dump the incident pictures are drawn from, on a made-up work dir:
/// the verifier's seconds become rows relative to the fault, nbd-server's log lines become the marks.
/// Needs python3 (as the incident suite does).
/// </summary>
[TestFixture]
[CancelAfter(30_000)]
public sealed class TimelineScriptTests
{
    private const double FaultBegin = 1_800_000_000.0;

    private string _dir = "";

    [SetUp]
    public void SetUp() => _dir = Directory.CreateTempSubdirectory("nbd-timeline-tests.").FullName;

    [TearDown]
    public void TearDown() => Directory.Delete(_dir, recursive: true);

    private static string RepositoryRoot()
    {
        for (string? dir = AppContext.BaseDirectory; dir is not null; dir = Path.GetDirectoryName(dir))
        {
            if (File.Exists(Path.Combine(dir, "nbd-server.sln")))
            {
                return dir;
            }
        }
        throw new InvalidOperationException("nbd-server.sln not found above the test binaries");
    }

    /// <summary>The log's time of day for an epoch, as nbd-server stamps its lines (local time).</summary>
    private static string Clock(double epoch) =>
        DateTimeOffset.FromUnixTimeMilliseconds((long)(epoch * 1000)).ToLocalTime().ToString("HH:mm:ss.fff", CultureInfo.InvariantCulture);

    private static string Second(double epoch, int ios, double latency, int errors = 0) =>
        string.Create(CultureInfo.InvariantCulture, $"verify: t=1 epoch={epoch:F3} ios={ios} reads=1 writes=1 flushes=0 errors={errors} max_lat_ms={latency:F1} oldest_ms=0.0");

    private (int Code, string Err) RunScript(params string[] args)
    {
        var psi = new ProcessStartInfo("python3", [Path.Combine(RepositoryRoot(), "scripts", "incident", "timeline.py"), .. args])
        {
            RedirectStandardError = true,
            RedirectStandardOutput = true,
        };
        using var p = Process.Start(psi)!;
        string err = p.StandardError.ReadToEnd();
        p.WaitForExit();
        return (p.ExitCode, err);
    }

    private void WriteWorkDir()
    {
        // Five seconds before the fault, ten after; the fault lasts 4 s; the repair ends at +7 s after 2.5 s.
        var seconds = Enumerable.Range(-5, 16).Select(i => Second(FaultBegin + i + 0.4, i is >= 1 and <= 2 ? 10 : 1000, i == 1 ? 900 : 5)).ToList();
        seconds.Add("verify: summary blocks_checked=10 blocks_wrong=0");
        File.WriteAllLines(Path.Combine(_dir, "verify.out"), seconds);
        File.WriteAllLines(Path.Combine(_dir, "events"), [
            string.Create(CultureInfo.InvariantCulture, $"fault_begin {FaultBegin:F3}"),
            string.Create(CultureInfo.InvariantCulture, $"fault_end {FaultBegin + 4:F3}"),
            string.Create(CultureInfo.InvariantCulture, $"all_active {FaultBegin + 7.2:F3}")]);
        File.WriteAllLines(Path.Combine(_dir, "up.log"), [
            $"{Clock(FaultBegin - 9)} INF Replica 1 (127.0.0.1:1) connected: region x",
            $"{Clock(FaultBegin + 0.5)} WRN Replica 1 (127.0.0.1:1) FAULTED: outstanding work over budget",
            $"{Clock(FaultBegin + 4.5)} INF Replica 1: live repair started for 64 of 64 extents",
            $"{Clock(FaultBegin + 7)} INF Replica 1 back in service after repairing 64 extents (39.0 MiB) in 2.50 s"]);
        // The fault's log lines: from line 1 (after the start-up line) to the end.
        File.WriteAllLines(Path.Combine(_dir, "loglines"), ["fault_begin up 1", "recovered up 4"]);
    }

    [Test]
    public void Seconds_become_rows_from_the_fault_and_the_log_becomes_marks()
    {
        WriteWorkDir();
        string prefix = Path.Combine(_dir, "out");

        var (code, err) = RunScript(_dir, prefix);

        Assert.That(code, Is.EqualTo(0), err);
        string[] csv = File.ReadAllLines(prefix + ".csv");
        string[] marks = File.ReadAllLines(prefix + ".marks");
        Assert.Multiple(() =>
        {
            Assert.That(csv[0], Is.EqualTo("t_s,iops,latency_ms,errors"));
            Assert.That(csv, Has.Length.EqualTo(17), "the header and every second");
            // The second ending 1.4 s after the fault began is drawn at its middle, 0.9 s.
            Assert.That(csv, Does.Contain("0.9,10,900.0,0"));
            Assert.That(marks, Is.EqualTo(new[] { "fault 0.00,4.00", "repair 4.50,7.00", "event 0.50:replica faulted" }));
        });
    }

    [Test]
    public void A_log_without_repair_lines_leaves_the_repair_unmarked()
    {
        WriteWorkDir();
        File.WriteAllLines(Path.Combine(_dir, "up.log"), ["06:00:00.000 INF Serving NBD", "something else"]);
        string prefix = Path.Combine(_dir, "out");

        var (code, err) = RunScript(_dir, prefix);

        Assert.That(code, Is.EqualTo(0), err);
        Assert.That(File.ReadAllLines(prefix + ".marks"), Is.EqualTo(new[] { "fault 0.00,4.00" }));
    }

    [Test]
    public void A_run_without_the_fault_fails_with_a_message()
    {
        File.WriteAllText(Path.Combine(_dir, "verify.out"), Second(FaultBegin, 100, 5) + "\n");

        var (code, err) = RunScript(_dir, Path.Combine(_dir, "out"));

        Assert.That(code, Is.Not.EqualTo(0));
        Assert.That(err, Does.Contain("no fault_begin"));
    }
}

using System.Diagnostics;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// Live repair, end to end with real processes: three <c>nbd-downstairs</c>, <c>nbd-server</c> and the
/// <c>nbd-verify</c> load with its write log. A replica is killed under load, misses writes and comes
/// back through live repair while the load goes on; then — besides the plain case — it fails again
/// in the middle of its repair, or the upstairs itself dies in the middle of it. Every run ends with
/// the volume read back against the write log (no acknowledged write lost, nothing torn or misplaced)
/// and <c>nbd-downstairs compare</c> of the three stopped regions (identical, block for block).
/// Every wait is bounded: the test's token (CancelAfter) and a deadline per poll.
/// </summary>
[TestFixture]
[Category("Replicated")]
[NonParallelizable]
public sealed partial class LiveRepairTests
{
    private const long MiB = 1L << 20;

    /// <summary>How long a replica's state may take to follow a kill or a restart (the reconnect backoff is at most 2 s).</summary>
    private static readonly TimeSpan StateTimeout = TimeSpan.FromSeconds(20);

    /// <summary>How long a repair may take back to service (today's repair of 120 extents under load took up to 19 s, at 6-20 MiB/s on a busy 2-core machine).</summary>
    private static readonly TimeSpan RepairTimeout = TimeSpan.FromSeconds(45);

    private ReplicatedVolumeFixture? _volume;
    private readonly List<VerifierProcess> _verifiers = [];
    private readonly Stopwatch _clock = new();

    [SetUp]
    public void SetUp() => _clock.Restart();

    [TearDown]
    public void TearDown()
    {
        foreach (VerifierProcess v in _verifiers)
        {
            v.Dispose();
        }
        _verifiers.Clear();
        if (_volume is not null && TestContext.CurrentContext.Result.Outcome.Status == NUnit.Framework.Interfaces.TestStatus.Failed)
        {
            TestContext.Out.WriteLine(_volume.AllLogs());
        }
        _volume?.Dispose();
        _volume = null;
    }

    private ReplicatedVolumeFixture Volume => _volume ?? throw new InvalidOperationException("no volume");

    private static string Bytes(long value) => value.ToString(System.Globalization.CultureInfo.InvariantCulture);

    private void Note(string what) => TestContext.Out.WriteLine($"{_clock.Elapsed.TotalSeconds,6:0.00} s  {what}");

    private async Task<ReplicatedVolumeFixture> StartVolumeAsync(string name, long size, params string[] upstairsArgs)
    {
        _volume = await ReplicatedVolumeFixture.StartAsync(name, size, upstairsArgs);
        Note($"volume of {size / MiB} MiB up (1 MiB extents): nbd-server on {_volume.Uri}");
        return _volume;
    }

    private async Task<VerifierProcess> StartLoadAsync(string logName, params string[] args)
    {
        VerifierProcess verifier = await VerifierProcess.StartAsync(Volume.Uri, Path.Combine(Volume.Scratch, logName), args);
        _verifiers.Add(verifier);
        return verifier;
    }

    /// <summary>
    /// The volume of the tests that interrupt a repair: its first <see cref="InterruptedLoadRange"/>
    /// take the random 4k load, the rest the bulk writes. 96 extents: today's repair (~40 MiB/s idle,
    /// 7-20 MiB/s under load on a busy 2-core machine) copies them in 2-14 s, so a test stays well
    /// under a minute, and a repair many times faster still lasts long enough to be caught.
    /// </summary>
    private const long InterruptedVolumeSize = 96 * MiB;

    private const long InterruptedLoadRange = 32 * MiB;

    /// <summary>
    /// A load that rewrites everything after <see cref="InterruptedLoadRange"/> in 256 KiB blocks
    /// (every extent of it, several times over) for two seconds, then flushes and verifies it: while a
    /// replica is out, this makes its repair long enough to be caught in the middle.
    /// </summary>
    private async Task<VerifierResult> WriteBulkAsync(string logName, CancellationToken cancellationToken)
    {
        const long range = InterruptedVolumeSize - InterruptedLoadRange;
        VerifierProcess bulk = await StartLoadAsync(logName, "--offset", Bytes(InterruptedLoadRange), "--range", Bytes(range), "--block-size", "262144",
            "--read-percent", "0", "--qd", "8", "--duration", "2", "--seed", "7");
        VerifierResult result = await bulk.WaitAsync(cancellationToken);
        AssertVerified(result, "bulk writes while the replica was out");
        Note($"bulk writes done: {result["ios"]} writes of 256 KiB ({result["ios"] / 4} MiB) over {range / MiB} MiB");
        return result;
    }

    private static void AssertVerified(VerifierResult result, string what)
    {
        Assert.Multiple(() =>
        {
            Assert.That(result.ExitCode, Is.EqualTo(VerifierResult.ExitOk), $"{what}: {result}");
            Assert.That(result["blocks_checked"], Is.GreaterThan(0), $"{what}: the read-back ran\n{result}");
            Assert.That(result["blocks_wrong"], Is.EqualTo(0), $"{what}: wrong blocks\n{result}");
            Assert.That(result["read_mismatches"], Is.EqualTo(0), $"{what}: reads during the load returned wrong data\n{result}");
            if (result.Summary.ContainsKey("final_flush"))
            {
                Assert.That(result.Text("final_flush"), Is.EqualTo("ok"), $"{what}: {result}");
            }
        });
    }

    private async Task KillDownstairsAsync(int index, CancellationToken cancellationToken)
    {
        Volume.Downstairs[index].Kill();
        Note($"SIGKILL downstairs {index}");
        await WaitForAsync(s => s.States[index] is not ("Active" or "Repairing"), StateTimeout, $"replica {index} out of service", cancellationToken);
    }

    /// <summary>Polls the control socket (every 20 ms) until <paramref name="condition"/> holds; fails with the last status at the deadline.</summary>
    private async Task<VolumeStatus> WaitForAsync(Func<VolumeStatus, bool> condition, TimeSpan timeout, string what, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        VolumeStatus status = await Volume.ControlStatusAsync(cancellationToken);
        while (!condition(status))
        {
            if (clock.Elapsed > timeout)
            {
                Assert.Fail($"{what}: not reached within {timeout.TotalSeconds:0} s; last status:\n{status.Json}\n{Volume.AllLogs()}");
            }
            await Task.Delay(20, cancellationToken);
            status = await Volume.ControlStatusAsync(cancellationToken);
        }
        Note($"{what} ({clock.Elapsed.TotalSeconds:0.00} s)");
        return status;
    }

    /// <summary>Extents a repair must have copied before the tests that interrupt it do so: some committed copies, most still to come.</summary>
    private const int InterruptAfterExtents = 4;

    /// <summary>
    /// Restarts downstairs <paramref name="index"/> and waits until its live repair is running:
    /// state Repairing with a few but not all of its extents copied. A repair that ends before it was
    /// seen running fails the test (there was too little to repair for the test to mean anything).
    /// </summary>
    private async Task<VolumeStatus> RestartAndCatchRepairAsync(int index, CancellationToken cancellationToken)
    {
        await Volume.Downstairs[index].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        Note($"downstairs {index} restarted");
        VolumeStatus status = await WaitForAsync(
            s => s.States[index] == "Active"
                || (s.States[index] == "Repairing" && s.RepairDone[index] >= InterruptAfterExtents && s.RepairDone[index] < s.RepairTotal[index]),
            StateTimeout, $"replica {index} in the middle of its repair", cancellationToken);
        Assert.That(status.States[index], Is.EqualTo("Repairing"),
            $"replica {index}'s repair was over before it could be caught running; write more while it is out\n{status.Json}");
        Note($"replica {index} repairing: {status.RepairDone[index]}/{status.RepairTotal[index]} extents copied");
        return status;
    }

    private async Task<VolumeStatus> WaitAllActiveAsync(CancellationToken cancellationToken)
    {
        VolumeStatus status = await WaitForAsync(s => s.AllActive, RepairTimeout, "all three replicas in service", cancellationToken);
        Assert.That(status.InService, Is.EqualTo(3), status.Json);
        return status;
    }

    /// <summary>Stops everything (nbd-server drains and flushes first), then the three regions must compare identical.</summary>
    private async Task AssertRegionsIdenticalAsync()
    {
        await Volume.StopAllAsync();
        ExternalTool.Result compare = await Volume.CompareAsync();
        Note("regions compared");
        Assert.That(compare.ExitCode, Is.EqualTo(0), $"nbd-downstairs compare:\n{compare}\n{Volume.AllLogs()}");
        Assert.That(compare.Output, Does.Contain("IDENTICAL"), compare.ToString());
    }

    /// <summary>The engine's line at the end of a repair: extents and MiB copied, seconds taken.</summary>
    private static Match[] RepairDoneLines(string log, int replica) =>
        Regex.Matches(log, $@"Replica {replica} back in service after repairing (\d+) extents \(([0-9.]+) MiB\) in ([0-9.]+) s").ToArray();

    [Test]
    [CancelAfter(90_000)]
    public async Task A_replica_killed_under_load_is_live_repaired_while_the_load_goes_on_and_ends_identical_with_no_wrong_block(CancellationToken cancellationToken)
    {
        // 64 extents, all of them under the random 4k load: the replica misses writes in every extent.
        ReplicatedVolumeFixture volume = await StartVolumeAsync("repair-load", 64 * MiB);
        VerifierProcess load = await StartLoadAsync("load.vlog", "--qd", "16", "--duration", "300", "--seed", "11");
        Note("load running");
        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);

        await KillDownstairsAsync(1, cancellationToken);
        await Task.Delay(TimeSpan.FromSeconds(3), cancellationToken);
        await volume.Downstairs[1].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        Note("downstairs 1 restarted");
        await WaitAllActiveAsync(cancellationToken);
        Assert.That(load.HasExited, Is.False, $"the load ran through the repair\n{load.Log}");

        // The repaired replica now takes every write: a second of load on all three, then the read-back.
        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
        VerifierResult result = await load.StopAsync();
        Note($"load stopped: {result["ios"]} IOs, {result["io_errors"]} errors, fewest IOs in a second {result["min_ios_per_s"]}, {result["blocks_checked"]} blocks read back in {result.Text("verify_s")} s");
        AssertVerified(result, "the load across the repair");
        Assert.That(result["blocks_checked"], Is.EqualTo(64 * MiB / 4096), "the whole volume was read back");

        Match[] repaired = RepairDoneLines(volume.Upstairs!.Log, 1);
        Assert.That(repaired, Has.Length.EqualTo(1), volume.Upstairs.Log);
        Note($"repair: {repaired[0].Groups[1].Value} extents, {repaired[0].Groups[2].Value} MiB in {repaired[0].Groups[3].Value} s");
        Assert.That(int.Parse(repaired[0].Groups[1].Value, System.Globalization.CultureInfo.InvariantCulture), Is.GreaterThan(0), "the repair had work to do");
        await AssertRegionsIdenticalAsync();
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task A_replica_killed_again_in_the_middle_of_its_repair_comes_back_and_ends_identical_with_no_wrong_block(CancellationToken cancellationToken)
    {
        // The random 4k load on the first 32 MiB; while replica 1 is out, the other 64 MiB are
        // rewritten in 256 KiB blocks, so its repair has every extent of the volume to copy.
        ReplicatedVolumeFixture volume = await StartVolumeAsync("repair-refault", InterruptedVolumeSize, await RepairSlowerArgsAsync());
        VerifierProcess load = await StartLoadAsync("load.vlog", "--range", Bytes(InterruptedLoadRange), "--qd", "16", "--duration", "300", "--seed", "12");
        Note("load running");
        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);

        await KillDownstairsAsync(1, cancellationToken);
        await WriteBulkAsync("bulk.vlog", cancellationToken);
        VolumeStatus repairing = await RestartAndCatchRepairAsync(1, cancellationToken);

        await KillDownstairsAsync(1, cancellationToken);
        Note($"replica 1 killed mid-repair at {repairing.RepairDone[1]}/{repairing.RepairTotal[1]} extents");
        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
        await volume.Downstairs[1].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        Note("downstairs 1 restarted again");
        VolumeStatus back = await WaitAllActiveAsync(cancellationToken);
        Assert.That(back.Faults[1], Is.GreaterThanOrEqualTo(2), $"replica 1 faulted twice\n{back.Json}");
        Assert.That(load.HasExited, Is.False, $"the load ran through both repairs\n{load.Log}");

        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
        VerifierResult result = await load.StopAsync();
        Note($"load stopped: {result["ios"]} IOs, {result["io_errors"]} errors");
        AssertVerified(result, "the random load across both repairs");
        AssertVerified(await VerifierProcess.CheckOnlyAsync(volume.Uri, Path.Combine(volume.Scratch, "bulk.vlog"), cancellationToken), "the bulk range after the repairs");
        Note("bulk range checked against its log");

        foreach (Match m in RepairDoneLines(volume.Upstairs!.Log, 1))
        {
            Note($"repair: {m.Groups[1].Value} extents, {m.Groups[2].Value} MiB in {m.Groups[3].Value} s");
        }
        Assert.That(RepairDoneLines(volume.Upstairs!.Log, 1), Has.Length.EqualTo(1), "only the second repair finished");
        await AssertRegionsIdenticalAsync();
    }

    [Test]
    [CancelAfter(120_000)]
    public async Task An_upstairs_killed_in_the_middle_of_a_repair_restarts_reconciles_and_keeps_every_flushed_write_and_the_regions_end_identical(CancellationToken cancellationToken)
    {
        ReplicatedVolumeFixture volume = await StartVolumeAsync("repair-upcrash", InterruptedVolumeSize, await RepairSlowerArgsAsync());
        ulong firstGeneration = (await volume.ControlStatusAsync(cancellationToken)).Generation;
        string loadLog = Path.Combine(volume.Scratch, "load.vlog");
        VerifierProcess load = await StartLoadAsync("load.vlog", "--range", Bytes(InterruptedLoadRange), "--qd", "16", "--duration", "300", "--seed", "13");
        Note("load running");
        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);

        await KillDownstairsAsync(1, cancellationToken);
        await WriteBulkAsync("bulk.vlog", cancellationToken);
        await RestartAndCatchRepairAsync(1, cancellationToken);

        volume.KillUpstairs();
        Note("SIGKILL nbd-server mid-repair");
        // The verifier loses its connection: it saves its log with every write not followed by a
        // successful flush marked uncertain (old or new data acceptable), flushed ones promised.
        VerifierResult lost = await load.WaitAsync(cancellationToken);
        Assert.That(lost.ExitCode, Is.EqualTo(VerifierResult.ExitConnectionLost), lost.ToString());
        Assert.That(lost["read_mismatches"], Is.EqualTo(0), lost.ToString());
        Note($"load lost its connection after {lost["ios"]} IOs");

        await volume.StartUpstairsAsync();
        Note("nbd-server restarted");
        VolumeStatus status = await WaitAllActiveAsync(cancellationToken);
        Assert.That(status.Generation, Is.GreaterThan(firstGeneration), status.Json);
        Assert.That(volume.Upstairs!.Log, Does.Match($@"Generation {status.Generation}: reconciled 3 replicas, \d+ extents repaired"));
        Note(Regex.Match(volume.Upstairs.Log, @"reconciled 3 replicas, \d+ extents repaired").Value);

        AssertVerified(await VerifierProcess.CheckOnlyAsync(volume.Uri, loadLog, cancellationToken), "the random load's range after the crash (flushed writes kept)");
        AssertVerified(await VerifierProcess.CheckOnlyAsync(volume.Uri, Path.Combine(volume.Scratch, "bulk.vlog"), cancellationToken), "the bulk range after the crash");
        Note("both ranges checked against their logs");

        // The restarted volume serves: the same log goes on for two seconds, checked online at the end.
        VerifierProcess again = await StartLoadAsync("load.vlog", "--range", Bytes(InterruptedLoadRange), "--qd", "16", "--duration", "2", "--seed", "14");
        AssertVerified(await again.WaitAsync(cancellationToken), "the load after the restart");
        Note("load after the restart verified");
        await AssertRegionsIdenticalAsync();
    }

    [Test]
    [CancelAfter(90_000)]
    
    public async Task A_long_outage_overflows_the_change_record_which_is_dropped_with_one_log_line_and_the_repair_compares_extents_and_ends_identical(CancellationToken cancellationToken)
    {
        // 1 MiB of marked data is far less than what 3 s of random 4k writes mark: the record is dropped.
        ReplicatedVolumeFixture volume = await StartVolumeAsync("repair-record-full", 64 * MiB, "--change-record-max-bytes", "1MiB");
        VerifierProcess load = await StartLoadAsync("load.vlog", "--qd", "16", "--duration", "300", "--seed", "15");
        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);

        await KillDownstairsAsync(1, cancellationToken);
        await Task.Delay(TimeSpan.FromSeconds(3), cancellationToken);
        await volume.Downstairs[1].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        Note("downstairs 1 restarted");
        // The repair's mode while it runs, when a poll catches it.
        string? mode = null;
        await WaitForAsync(s =>
        {
            if (s.States[1] == "Repairing")
            {
                using var json = System.Text.Json.JsonDocument.Parse(s.Json);
                mode ??= json.RootElement.GetProperty("replicas")[1].TryGetProperty("repairMode", out var m) ? m.GetString() : null;
            }
            return s.AllActive;
        }, RepairTimeout, "all three replicas in service", cancellationToken);
        Note($"repair mode seen: {mode ?? "(not caught)"}");

        await Task.Delay(TimeSpan.FromSeconds(1), cancellationToken);
        AssertVerified(await load.StopAsync(), "the load across the repair");

        string log = volume.Upstairs!.Log;
        string[] dropped = [.. log.Split('\n').Where(l => ChangeRecordDropped().IsMatch(l))];
        Assert.That(dropped, Has.Length.EqualTo(1), $"one line says the change record was dropped:\n{log}");
        Note(dropped[0].Trim());
        if (mode is not null)
        {
            Assert.That(mode, Is.EqualTo("extents"), "with the record dropped, the repair compares extents");
        }
        Assert.That(RepairDoneLines(log, 1), Has.Length.EqualTo(1), log);
        await AssertRegionsIdenticalAsync();
    }

    [TestCase(true, TestName = "A_stop_during_a_live_repair_lets_it_finish_and_the_regions_end_identical")]
    [TestCase(false, TestName = "A_stop_past_the_repair_grace_leaves_the_replica_behind_and_the_next_start_reconciles_it")]
    [CancelAfter(150_000)]
    public async Task A_stop_during_a_live_repair(bool withinGrace, CancellationToken cancellationToken)
    {
        // The repair is slowed to 16 MiB/s so the stop finds it running: the 64 MiB rewritten while
        // replica 1 was out take about 4 s to copy, well inside a 60 s grace and outside a zero one.
        ReplicatedVolumeFixture volume = await StartVolumeAsync("repair-stop", InterruptedVolumeSize,
            "--repair-rate-limit", "16", "--stop-repair-grace", withinGrace ? "60" : "0");
        // No load runs: the bulk writes find the killed replica gone.
        volume.Downstairs[1].Kill();
        Note("SIGKILL downstairs 1");
        await WriteBulkAsync("bulk.vlog", cancellationToken);
        await WaitForAsync(s => s.States[1] is not ("Active" or "Repairing"), StateTimeout, "replica 1 out of service", cancellationToken);
        await RestartAndCatchRepairAsync(1, cancellationToken);

        NbdServerProcess upstairs = volume.Upstairs!;
        Assert.That(await upstairs.StopAsync(ReplicatedVolumeFixture.ProcessTimeout), Is.EqualTo(0), upstairs.Log);
        Note("nbd-server stopped");
        if (withinGrace)
        {
            Assert.That(upstairs.Log, Does.Contain("Stopping: replica 1's live repair has").And.Contain("Replica 1 back in service after repairing"), upstairs.Log);
            Assert.That(upstairs.Log, Does.Not.Contain("left behind"));
            await AssertRegionsIdenticalAsync();
            return;
        }
        Assert.That(upstairs.Log, Does.Contain("Stopping with replica 1 under live repair").And.Contain("left behind"), upstairs.Log);
        await Task.WhenAll(volume.Downstairs.Select(d => d.StopAsync(ReplicatedVolumeFixture.ProcessTimeout)));
        ExternalTool.Result differ = await volume.CompareAsync();
        Assert.That(differ.Output, Does.Not.Contain("IDENTICAL"), "the replica left behind differs until a start reconciles it");
        // The next activation finds its extents behind (older flush numbers) and copies them.
        foreach (DownstairsNode d in volume.Downstairs)
        {
            await d.StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        }
        await volume.StartUpstairsAsync();
        Note("nbd-server started again");
        AssertVerified(await VerifierProcess.CheckOnlyAsync(volume.Uri, Path.Combine(volume.Scratch, "bulk.vlog"), cancellationToken), "the bulk range after the restart");
        await AssertRegionsIdenticalAsync();
    }

    /// <summary>The fallback's log line; its exact wording is the engine's (issue 12: "one log line says so").</summary>
    [GeneratedRegex(@"(?i)changed-block record dropped")]
    private static partial Regex ChangeRecordDropped();

    /// <summary>
    /// When nbd-server has a repair rate limit (issue 12 adds --repair-rate-limit), 64 MiB/s: with a
    /// faster repair the tests that interrupt one could miss it. Without the option, none: today's
    /// repair of the 256 extents takes seconds anyway.
    /// </summary>
    private static async Task<string[]> RepairSlowerArgsAsync()
    {
        ExternalTool.Result help = await ReplicatedVolumeFixture.RunDotnetAsync("nbd-server.dll", ["--help"], TimeSpan.FromSeconds(30));
        return (help.Output + help.Error).Contains("--repair-rate-limit", StringComparison.Ordinal) ? ["--repair-rate-limit", "64"] : [];
    }
}

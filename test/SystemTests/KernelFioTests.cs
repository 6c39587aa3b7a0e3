using System.Diagnostics;
using System.Globalization;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// fio on <c>/dev/nbd0</c> the way users benchmark the volume: the Linux kernel's NBD client in the
/// qemu guest of scripts/kernel-test.sh (<c>KT_SUITE=fio</c>, scripts/kernel-test/fio-suite.sh),
/// libaio with <c>direct=1</c>, the job files of scripts/fio with crc32c verification, against the
/// replicated volume (three <c>nbd-downstairs</c> and <c>nbd-server --downstairs</c>). One boot runs
/// every round; the guest asks for each fault over <see cref="GuestControl"/> and waits until it is
/// done, so the faults always land while its fio job runs:
/// one connection and then four (<c>-C 4</c>, requests split at a lowered max_sectors_kb), each with
/// a replica killed and restarted under the mixed job, which goes on until the replica is back in
/// service; a replica stalled (SIGSTOP) for longer than the kernel's request timeout; nbd-server
/// reloaded twice (SIGHUP: a new image takes the four connections over) under the mixed job, with
/// no error in the guest; nbd-server restarted under an idle <c>nbd-client -nonetlink -persist</c>
/// device, after which what was written before reads back intact (Debian 12's nbd-client does not
/// reconnect after a server restart: see round 5 in fio-suite.sh). Afterwards the three regions
/// must be identical.
/// </summary>
[TestFixture]
[Category("Kernel")]
[NonParallelizable]
public sealed partial class KernelFioTests
{
    private const string SuccessMarker = "KT-RESULT: KERNEL-NBD-OK";

    private const long VolumeSize = 128L << 20;

    /// <summary>How long a killed replica may take to show as out of service (the engine notices a closed link at once).</summary>
    private static readonly TimeSpan StateTimeout = TimeSpan.FromSeconds(20);

    /// <summary>How long a replica may take back into service: reconnect backoff (≤ 2 s) and a catch-up repair under the guest's load.</summary>
    private static readonly TimeSpan RepairTimeout = TimeSpan.FromSeconds(90);

    /// <summary>The whole guest run (today about a minute on a busy 2-core machine); kernel-test.sh kills qemu after it.</summary>
    private const int GuestTimeoutSeconds = 330;

    private readonly Stopwatch _clock = new();
    private VolumeStatus? _afterStall;

    [Test]
    [CancelAfter(7 * 60 * 1000)]
    public async Task Fio_verifies_on_the_kernel_client_with_one_and_four_connections_through_replica_kills_a_stall_and_an_upstairs_restart_and_the_regions_end_identical(CancellationToken cancellationToken)
    {
        RealClient.Require("/usr/bin/fio", "fio");
        _clock.Restart();
        using ReplicatedVolumeFixture volume = await ReplicatedVolumeFixture.StartAsync("kernel-fio", VolumeSize);
        string consoleLog = Path.Combine(TestContext.CurrentContext.WorkDirectory, "kernel-test-fio-console.log");
        ExternalTool.Result result;
        IReadOnlyList<string> events;
        await using (GuestControl control = GuestControl.Start((request, token) => HandleAsync(volume, request, token)))
        {
            result = await ExternalTool.RunAsync("/usr/bin/env",
                [$"KT_LOG={consoleLog}", $"KT_TIMEOUT={GuestTimeoutSeconds}", "KT_SUITE=fio", $"KT_CTL_PORT={control.Port}",
                    Path.Combine(Repository.Root, "scripts", "kernel-test.sh"), volume.Upstairs!.Port.ToString(CultureInfo.InvariantCulture)],
                TimeSpan.FromSeconds(GuestTimeoutSeconds + 60));
            events = control.Events;
        }
        if (File.Exists(consoleLog))
        {
            TestContext.AddTestAttachment(consoleLog, "guest serial console");
        }
        TestContext.Out.WriteLine(result.Error);
        TestContext.Out.WriteLine("--- guest requests ---");
        TestContext.Out.WriteLine(string.Join('\n', events));
        string console = File.Exists(consoleLog) ? File.ReadAllText(consoleLog).Replace("\r", "", StringComparison.Ordinal) : "";
        TestContext.Out.WriteLine("--- guest results ---");
        TestContext.Out.WriteLine(string.Join('\n', console.Split('\n').Where(l => l.StartsWith("kt: ", StringComparison.Ordinal))));

        Assert.That(result.ExitCode, Is.EqualTo(0), $"kernel-test.sh failed\n{result}\n{volume.AllLogs()}");
        Assert.That(console, Does.Contain(SuccessMarker));
        string[] expected = ["kill 1", "start 1", "kill 2", "start 2", "stop 0", "cont 0", "reload-upstairs", "restart-upstairs"];
        Assert.That(events.Select(e => EventLine().Match(e).Groups[1].Value), Is.SupersetOf(expected), string.Join('\n', events));
        Assert.That(events, Has.All.EndsWith("-> ok"), string.Join('\n', events));
        // The guest's own checks printed these; the host makes sure they ran.
        Assert.That(console, Does.Match(@"1M writes went out as \d+ requests for 65536 KiB \(max_sectors_kb 64\)"));
        Assert.That(Regex.Matches(console, @"mixed job: \d+ passes, each verified"), Has.Count.EqualTo(5));
        // Each "ok" means a new image of the same process took the guest's connections over (ReloadAsync checks).
        Assert.That(events.Count(e => EventLine().Match(e).Groups[1].Value == "reload-upstairs"), Is.EqualTo(2), "two reloads during round 4's mixed job");
        Assert.That(console, Does.Contain("the blocks written before the restart read back intact"));
        Assert.That(_afterStall, Is.Not.Null);
        Assert.That(_afterStall!.Faults[0], Is.GreaterThanOrEqualTo(1), $"the stalled replica was taken out of service while stopped\n{_afterStall.Json}");

        string logs = volume.AllLogs();
        Assert.That(logs, Does.Not.Contain("dropped:"), "no protocol violation by the kernel client");
        await volume.StopAllAsync();
        ExternalTool.Result compare = await volume.CompareAsync();
        Note("regions compared");
        Assert.That(compare.ExitCode, Is.EqualTo(0), $"nbd-downstairs compare:\n{compare}\n{volume.AllLogs()}");
        Assert.That(compare.Output, Does.Contain("IDENTICAL"), compare.ToString());
    }

    /// <summary>Does what the guest asked (fio-suite.sh's host_event); throws with the reason if it cannot.</summary>
    private async Task HandleAsync(ReplicatedVolumeFixture volume, string request, CancellationToken cancellationToken)
    {
        Note($"guest asks: {request}");
        switch (request.Split(' ', StringSplitOptions.RemoveEmptyEntries))
        {
            case ["kill", string n]:
                {
                    int index = Replica(n);
                    volume.Downstairs[index].Kill();
                    await WaitForAsync(volume, s => s.States[index] is not ("Active" or "Repairing"), StateTimeout, $"replica {index} out of service", cancellationToken);
                    break;
                }
            case ["start", string n]:
                await volume.Downstairs[Replica(n)].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
                break;
            case ["stop", string n]:
                volume.Downstairs[Replica(n)].Signal("STOP");
                break;
            case ["cont", string n]:
                _afterStall = await volume.ControlStatusAsync(cancellationToken);
                volume.Downstairs[Replica(n)].Signal("CONT");
                break;
            case ["wait-active"]:
                await WaitForAsync(volume, s => s.AllActive, RepairTimeout, "all three replicas in service", cancellationToken);
                break;
            case ["reload-upstairs"]:
                await volume.ReloadUpstairsAsync();
                await WaitForAsync(volume, s => s.AllActive, RepairTimeout, "all three replicas in service after the reload", cancellationToken);
                break;
            case ["restart-upstairs"]:
                await volume.RestartUpstairsOnItsPortAsync();
                await WaitForAsync(volume, s => s.AllActive, RepairTimeout, "all three replicas in service after the restart", cancellationToken);
                break;
            default:
                throw new InvalidOperationException($"unknown request '{request}'");
        }
        Note($"done: {request}");
    }

    private static int Replica(string n) =>
        int.TryParse(n, NumberStyles.None, CultureInfo.InvariantCulture, out int index) && index is >= 0 and < 3
            ? index
            : throw new InvalidOperationException($"no replica '{n}'");

    /// <summary>Polls the control socket every 100 ms until <paramref name="condition"/> holds; throws with the last status at the deadline.</summary>
    private async Task WaitForAsync(ReplicatedVolumeFixture volume, Func<VolumeStatus, bool> condition, TimeSpan timeout, string what, CancellationToken cancellationToken)
    {
        var clock = Stopwatch.StartNew();
        VolumeStatus status = await volume.ControlStatusAsync(cancellationToken);
        while (!condition(status))
        {
            if (clock.Elapsed > timeout)
            {
                throw new TimeoutException($"{what}: not reached within {timeout.TotalSeconds:0} s; last status: {status.Json}");
            }
            await Task.Delay(100, cancellationToken);
            status = await volume.ControlStatusAsync(cancellationToken);
        }
        Note($"{what} ({clock.Elapsed.TotalSeconds:0.0} s)");
    }

    private void Note(string what) => TestContext.Out.WriteLine($"{_clock.Elapsed.TotalSeconds,6:0.0} s  {what}");

    /// <summary>The request of a <see cref="GuestControl.Events"/> line.</summary>
    [GeneratedRegex(@"s  (.*) -> ")]
    private static partial Regex EventLine();
}

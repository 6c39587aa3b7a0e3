using System.Diagnostics;
using System.Globalization;
using System.Text.Json;
using System.Text.RegularExpressions;

namespace NbdServer.SystemTests;

/// <summary>
/// The replicated volume as separate real processes — three <c>nbd-downstairs</c> and
/// <c>nbd-server --downstairs</c> on loopback — driven by real clients (nbdcopy, qemu-io, fio,
/// nbdsh) while downstairs are killed, brought back and corrupted. Replica convergence is checked
/// with <c>nbd-downstairs compare</c> once everything has been stopped.
/// </summary>
[TestFixture]
[Category("Replicated")]
[NonParallelizable]
[CancelAfter(120_000)]
public sealed partial class ReplicatedVolumeTests
{
    private const string Nbdcopy = "/usr/bin/nbdcopy";
    private const string Fio = "/usr/bin/fio";
    private const long VolumeSize = 256L << 20;

    private ReplicatedVolumeFixture? _volume;

    private ReplicatedVolumeFixture Volume => _volume ?? throw new InvalidOperationException("no volume");

    [TearDown]
    public void TearDown()
    {
        if (_volume is not null && TestContext.CurrentContext.Result.Outcome.Status == NUnit.Framework.Interfaces.TestStatus.Failed)
        {
            TestContext.Out.WriteLine(_volume.AllLogs());
        }
        _volume?.Dispose();
        _volume = null;
    }

    private async Task<ReplicatedVolumeFixture> StartAsync(string name, params string[] upstairsArgs)
    {
        _volume = await ReplicatedVolumeFixture.StartAsync(name, VolumeSize, upstairsArgs);
        return _volume;
    }

    private static void AssertQemuIoClean(ExternalTool.Result result, string what)
    {
        Assert.That(result.ExitCode, Is.EqualTo(0), $"{what}: {result}");
        Assert.That(result.Output + result.Error, Does.Not.Contain("Pattern verification failed").And.Not.Contain("error").And.Not.Contain("failed"), $"{what}: {result}");
    }

    /// <summary>Stops everything (flushing), then asserts that the three regions compare identical.</summary>
    private async Task AssertReplicasConvergedAsync()
    {
        await Volume.StopAllAsync();
        ExternalTool.Result compare = await Volume.CompareAsync();
        Assert.That(compare.ExitCode, Is.EqualTo(0), $"nbd-downstairs compare:\n{compare}\n{Volume.AllLogs()}");
        Assert.That(compare.Output, Does.Contain("IDENTICAL"));
    }

    private static async Task<(JsonElement Job, ExternalTool.Result Raw)> RunFioAsync(string jobFile, TimeSpan timeout)
    {
        ExternalTool.Result result = await RealClient.RunAsync(Fio, ["--output-format=json", jobFile], timeout);
        Assert.That(result.ExitCode, Is.EqualTo(0), result.ToString());
        int start = result.Output.IndexOf('{', StringComparison.Ordinal);
        Assert.That(start, Is.GreaterThanOrEqualTo(0), result.ToString());
        using JsonDocument json = JsonDocument.Parse(result.Output[start..]);
        return (json.RootElement.GetProperty("jobs")[0].Clone(), result);
    }

    private static string FioJob(string uri, long offset, long size, string bs) => $"""
        [global]
        ioengine=nbd
        uri={uri}
        rw=randwrite
        bs={bs}
        iodepth=32
        offset={offset}
        size={size}
        verify=crc32c
        do_verify=1
        verify_fatal=1
        verify_dump=0

        [load]
        """;

    private static void AssertFioWroteAndVerified(JsonElement job, ExternalTool.Result raw, long size)
    {
        Assert.Multiple(() =>
        {
            Assert.That(job.GetProperty("error").GetInt32(), Is.EqualTo(0), raw.ToString());
            Assert.That(job.GetProperty("write").GetProperty("io_bytes").GetInt64(), Is.EqualTo(size), "every byte written");
            Assert.That(job.GetProperty("read").GetProperty("io_bytes").GetInt64(), Is.EqualTo(size), "every byte read back and verified");
            Assert.That(raw.Error, Does.Not.Contain("verify:").And.Not.Contain("bad magic"), raw.Error);
        });
    }

    [Test]
    public async Task Data_written_with_nbdcopy_and_qemu_io_reads_back_and_the_replicas_compare_identical()
    {
        RealClient.Require(Nbdcopy, "libnbd-bin");
        ReplicatedVolumeFixture volume = await StartAsync("repl-basic");
        string source = Path.Combine(volume.Scratch, "source.bin");
        string sourceHash = RealClient.WriteRandomFile(source, 24L << 20, seed: 42);

        ExternalTool.Result upload = await RealClient.RunAsync(Nbdcopy, ["--flush", source, volume.Uri], TimeSpan.FromSeconds(60));
        Assert.That(upload.ExitCode, Is.EqualTo(0), upload.ToString());
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0xa5 100M 4M", "write -P 0x5a 200M 64k", "flush",
            "read -P 0xa5 100M 4M", "read -P 0x5a 200M 64k", "read -P 0 128M 1M"), "qemu-io");

        string back = Path.Combine(volume.Scratch, "back.bin");
        ExternalTool.Result download = await RealClient.RunAsync(Nbdcopy, [volume.Uri, back], TimeSpan.FromSeconds(60));
        Assert.That(download.ExitCode, Is.EqualTo(0), download.ToString());
        Assert.That(new FileInfo(back).Length, Is.EqualTo(VolumeSize));
        using (FileStream f = File.Open(back, FileMode.Open, FileAccess.ReadWrite))
        {
            f.SetLength(24L << 20);
        }
        Assert.That(RealClient.Sha256(back), Is.EqualTo(sourceHash), "nbdcopy data read back");

        VolumeStatus status = await volume.StatusAsync();
        Assert.That(status.AllActive, Is.True, status.Json);
        await AssertReplicasConvergedAsync();
    }

    [Test]
    public async Task A_dead_downstairs_is_replaced_by_an_empty_region_which_is_refused_by_the_running_upstairs_and_adopted_after_its_restart()
    {
        // The README's procedure for replacing a dead downstairs, end to end.
        ReplicatedVolumeFixture volume = await StartAsync("repl-replace");
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x11 8M 2M", "write -P 0x22 100M 1M", "flush"), "qemu-io before");
        DownstairsNode dead = volume.Downstairs[2];
        dead.Kill();
        Directory.Delete(dead.DataDir, recursive: true);
        ExternalTool.Result created = await ReplicatedVolumeFixture.RunDotnetAsync("nbd-downstairs.dll",
            ["create", "--data", dead.DataDir, "--size", VolumeSize.ToString(CultureInfo.InvariantCulture), "--block-size", "4096", "--extent-size", "256"],
            ReplicatedVolumeFixture.ProcessTimeout);
        Assert.That(created.ExitCode, Is.EqualTo(0), created.ToString());

        // A different region at that address is never mixed in by the upstairs that knew the old one.
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x33 8M 1M"), "qemu-io while replica 2 is dead");
        await dead.StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        await Task.Delay(TimeSpan.FromSeconds(3));
        VolumeStatus refusing = await volume.StatusAsync();
        Assert.That(refusing.States[2], Is.Not.EqualTo("Active").And.Not.EqualTo("Repairing"), refusing.Json);
        Assert.That(volume.Upstairs!.Log, Does.Contain("serves region"), "the refusal names the region it found");
        await dead.StopAsync(ReplicatedVolumeFixture.ProcessTimeout);

        // Restart the upstairs (it starts on the two live replicas), write, then start the new downstairs.
        volume.KillUpstairs();
        await volume.StartUpstairsAsync();
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x44 200M 1M", "flush"), "qemu-io on two replicas");
        await dead.StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        VolumeStatus adopted = await volume.WaitForStatusAsync(s => s.AllActive, TimeSpan.FromSeconds(60), "the new region adopted and live-repaired");
        Assert.That(adopted.InService, Is.EqualTo(3), adopted.Json);

        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "read -P 0x33 8M 1M", "read -P 0x11 9M 1M", "read -P 0x22 100M 1M", "read -P 0x44 200M 1M", "read -P 0 150M 1M"),
            "qemu-io read-back after the replacement");
        await AssertReplicasConvergedAsync();
    }

    [Test]
    public async Task Killing_one_downstairs_mid_load_keeps_IO_going_then_live_repair_brings_it_back_identical()
    {
        RealClient.Require(Fio, "fio");
        ReplicatedVolumeFixture volume = await StartAsync("repl-kill", "--no-progress-timeout", "3");
        string job = Path.Combine(volume.Scratch, "load.fio");
        const long loadSize = 160L << 20;
        await File.WriteAllTextAsync(job, FioJob(volume.Uri, 0, loadSize, "4k"));

        var clock = Stopwatch.StartNew();
        Task<(JsonElement, ExternalTool.Result)> load = RunFioAsync(job, TimeSpan.FromSeconds(90));
        await Task.Delay(1500);
        Assert.That(load.IsCompleted, Is.False, "the load finished before the kill; make it longer");
        volume.Downstairs[1].Kill();
        TestContext.Out.WriteLine($"killed downstairs 1 at {clock.Elapsed.TotalSeconds:0.0} s");

        VolumeStatus faulted = await volume.WaitForStatusAsync(s => s.States[1] == "Faulted", TimeSpan.FromSeconds(10), "replica 1 faulted");
        Assert.That(faulted.InService, Is.EqualTo(2), faulted.Json);
        (JsonElement result, ExternalTool.Result raw) = await load;
        TestContext.Out.WriteLine($"fio done at {clock.Elapsed.TotalSeconds:0.0} s");
        AssertFioWroteAndVerified(result, raw, loadSize);

        // Back on its port: the engine reconnects, repairs what it missed, and puts it back in service.
        await volume.Downstairs[1].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        VolumeStatus back = await volume.WaitForStatusAsync(s => s.AllActive, TimeSpan.FromSeconds(30), "replica 1 repaired back to Active");
        Assert.That(back.Faults[1], Is.GreaterThanOrEqualTo(1), back.Json);
        Assert.That(volume.Upstairs!.Log, Does.Contain("Replica 1 back in service"));

        // Healthy again: a second verified load on all three (the repaired one takes every write).
        string after = Path.Combine(volume.Scratch, "after.fio");
        await File.WriteAllTextAsync(after, FioJob(volume.Uri, 192L << 20, 32L << 20, "64k"));
        (JsonElement result2, ExternalTool.Result raw2) = await RunFioAsync(after, TimeSpan.FromSeconds(60));
        AssertFioWroteAndVerified(result2, raw2, 32L << 20);

        await AssertReplicasConvergedAsync();
    }

    [Test]
    public async Task With_two_downstairs_dead_writes_fail_EIO_within_the_bounded_wait_reads_go_on_and_writes_return_with_them()
    {
        await RealClient.RequireNbdshAsync();
        const double degradedTimeout = 2;
        ReplicatedVolumeFixture volume = await StartAsync("repl-two-down", "--degraded-write-timeout", degradedTimeout.ToString(CultureInfo.InvariantCulture));
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x6b 0 1M", "flush"), "initial write");

        volume.Downstairs[1].Kill();
        volume.Downstairs[2].Kill();
        string script = $$"""
            import errno, time
            h.connect_uri("{{volume.Uri}}")
            expected = bytes([0x6b]) * (1 << 20)
            for attempt in range(2):
                t = time.monotonic()
                try:
                    h.pwrite(b"\x77" * 65536, (8 << 20) + attempt * 65536)
                    print("WRITE-OK")
                except nbd.Error as e:
                    print("WRITE-ERR errno=%s" % errno.errorcode.get(e.errno, e.errno))
                print("ELAPSED=%.3f" % (time.monotonic() - t))
            for i in range(3):
                assert h.pread(1 << 20, 0) == expected, "read returned wrong data"
            print("READS-OK")
            """;
        ExternalTool.Result degraded = await RealClient.NbdshAsync(script, TimeSpan.FromSeconds(30));
        Assert.That(degraded.ExitCode, Is.EqualTo(0), $"{degraded}\n{volume.AllLogs()}");
        Assert.That(Regex.Matches(degraded.Output, "WRITE-ERR errno=EIO"), Has.Count.EqualTo(2), degraded.ToString());
        Assert.That(degraded.Output, Does.Contain("READS-OK").And.Not.Contain("WRITE-OK"), degraded.ToString());
        // The first write may be in flight when the replicas die (it fails as they fault); the
        // second one is admitted with one replica in service and waits the degraded timeout.
        double[] elapsed = [.. ElapsedLine().Matches(degraded.Output).Select(m => double.Parse(m.Groups[1].Value, CultureInfo.InvariantCulture))];
        TestContext.Out.WriteLine($"degraded writes failed after {string.Join(", ", elapsed.Select(e => e.ToString("0.000", CultureInfo.InvariantCulture)))} s");
        Assert.That(elapsed, Has.Length.EqualTo(2).And.All.LessThan(degradedTimeout + 2), "EIO must come within the degraded-write timeout (+2 s slack)");

        VolumeStatus down = await volume.StatusAsync();
        Assert.That(down.InService, Is.LessThan(2), down.Json);

        // Both return: no nbd-server restart, writes work again once two are in service.
        await Task.WhenAll(volume.Downstairs[1].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout), volume.Downstairs[2].StartAsync([], ReplicatedVolumeFixture.ProcessTimeout));
        await volume.WaitForStatusAsync(s => s.AllActive, TimeSpan.FromSeconds(30), "both replicas back in service");
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x2e 8M 1M", "flush", "read -P 0x2e 8M 1M", "read -P 0x6b 0 1M"), "writes after recovery");

        await AssertReplicasConvergedAsync();
    }

    [Test]
    public async Task A_corrupted_block_on_one_replica_is_read_correctly_and_the_copy_is_repaired()
    {
        ReplicatedVolumeFixture volume = await StartAsync("repl-rot");
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x3c 0 1M", "flush"), "write");

        // Flip bytes of block 5's data in replica 0's first extent while it runs: its reads come from
        // disk (pread), and with an idle volume the least-loaded choice is replica 0.
        string extent = Path.Combine(volume.Downstairs[0].DataDir, "extents", "e000000.dat");
        using (FileStream f = File.Open(extent, FileMode.Open, FileAccess.ReadWrite, FileShare.ReadWrite))
        {
            byte[] bytes = new byte[16];
            f.Position = (5 * 4096) + 100;
            f.ReadExactly(bytes);
            for (int i = 0; i < bytes.Length; i++)
            {
                bytes[i] ^= 0xFF;
            }
            f.Position = (5 * 4096) + 100;
            f.Write(bytes);
            f.Flush(flushToDisk: true);
        }
        ExternalTool.Result before = await volume.CompareAsync();
        Assert.That(before.ExitCode, Is.EqualTo(1), $"compare sees the rot before any read:\n{before}");
        Assert.That(before.Output, Does.Contain("region 0: 1 block(s) do not match their stored hash (first: block 5)"));

        // Read until a read has landed on the bad copy (bounded); every read must return the right data.
        for (int attempt = 0; attempt < 10 && !volume.Upstairs!.Log.Contains("was bad", StringComparison.Ordinal); attempt++)
        {
            AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "read -P 0x3c 0 1M"), "read over the corrupted block");
        }
        Assert.That(volume.Upstairs!.Log, Does.Match(@"Read of blocks \d+\+\d+ from replica 0 was bad \(block 5 does not match its stored hash\); served from replica [12] and repaired"));
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "read -P 0x3c 0 1M"), "read after repair");

        await AssertReplicasConvergedAsync();
    }

    [Test]
    public async Task A_restarted_upstairs_takes_a_higher_generation_reconciles_and_reads_the_flushed_data()
    {
        await RealClient.RequireNbdshAsync();
        ReplicatedVolumeFixture volume = await StartAsync("repl-upstairs");
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x91 0 2M", "write -P 0x92 50M 3M", "flush"), "flushed writes");
        ulong firstGeneration = (await volume.StatusAsync()).Generation;

        // Unflushed writes in flight when the upstairs dies: they may or may not survive, but the
        // replicas must be reconciled to one consistent answer.
        ExternalTool.Result unflushed = await RealClient.NbdshAsync($$"""
            h.connect_uri("{{volume.Uri}}")
            for i in range(64):
                h.pwrite(bytes([i]) * 65536, (100 << 20) + i * 65536)
            print("WROTE")
            """, TimeSpan.FromSeconds(30));
        Assert.That(unflushed.Output, Does.Contain("WROTE"), unflushed.ToString());
        volume.KillUpstairs();

        await volume.StartUpstairsAsync();
        VolumeStatus status = await volume.WaitForStatusAsync(s => s.AllActive, TimeSpan.FromSeconds(20), "all replicas in service after restart");
        Assert.That(status.Generation, Is.GreaterThan(firstGeneration), status.Json);
        Assert.That(volume.Upstairs!.Log, Does.Match($@"Generation {status.Generation}: reconciled 3 replicas"));
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "read -P 0x91 0 2M", "read -P 0x92 50M 3M", "write -P 0x93 60M 1M", "flush", "read -P 0x93 60M 1M"), "flushed data after restart");

        await AssertReplicasConvergedAsync();
        foreach (DownstairsNode d in volume.Downstairs)
        {
            ExternalTool.Result info = await ReplicatedVolumeFixture.RunDotnetAsync("nbd-downstairs.dll", ["info", "--data", d.DataDir], TimeSpan.FromSeconds(30));
            Assert.That(info.Output, Does.Contain($"generation:    {status.Generation} (highest seen)"), info.ToString());
        }
    }

    [GeneratedRegex(@"ELAPSED=([0-9.]+)")]
    private static partial Regex ElapsedLine();
}

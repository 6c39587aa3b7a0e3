namespace NbdServer.SystemTests;

/// <summary>
/// The replicated volume with mutual TLS on every upstairs ↔ downstairs link (certificates made by
/// the real nbd-certs), as real processes, driven by a real client.
/// </summary>
[TestFixture]
[Category("Replicated")]
[NonParallelizable]
[CancelAfter(180_000)]
public sealed class TlsReplicatedVolumeTests
{
    private const long VolumeSize = 64L << 20;

    private ReplicatedVolumeFixture? _volume;

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

    private static void AssertQemuIoClean(ExternalTool.Result result, string what)
    {
        Assert.That(result.ExitCode, Is.EqualTo(0), $"{what}: {result}");
        Assert.That(result.Output + result.Error, Does.Not.Contain("Pattern verification failed").And.Not.Contain("error").And.Not.Contain("failed"), $"{what}: {result}");
    }

    private async Task AssertReplicasConvergedAsync(ReplicatedVolumeFixture volume)
    {
        await volume.StopAllAsync();
        ExternalTool.Result compare = await volume.CompareAsync();
        Assert.That(compare.ExitCode, Is.EqualTo(0), $"nbd-downstairs compare:\n{compare}\n{volume.AllLogs()}");
        Assert.That(compare.Output, Does.Contain("IDENTICAL"));
    }

    [Test]
    public async Task Qemu_io_writes_and_reads_back_through_a_volume_whose_links_are_all_tls()
    {
        ReplicatedVolumeFixture volume = _volume = await ReplicatedVolumeFixture.StartTlsAsync("tls-qemu", VolumeSize);
        foreach (DownstairsNode d in volume.Downstairs)
        {
            Assert.That(d.Log, Does.Contain("TLS required"), $"downstairs {d.Index} serves TLS only");
        }
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0xa5 0 4M", "write -P 0x3c 8M 1M", "flush"), "write");
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "read -P 0xa5 0 4M", "read -P 0x3c 8M 1M", "read -P 0 16M 64k"), "read back");
        Assert.That(volume.AllLogs(), Does.Not.Contain("refused before Hello"));
        await AssertReplicasConvergedAsync(volume);
    }

    [Test]
    public async Task A_downstairs_restarted_under_tls_is_reconnected_and_repaired_over_tls()
    {
        ReplicatedVolumeFixture volume = _volume = await ReplicatedVolumeFixture.StartTlsAsync("tls-repair", VolumeSize);
        DownstairsNode victim = volume.Downstairs[1];
        victim.Kill();
        // Written while the replica is away: repair must copy these extents to it over its TLS link.
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "write -P 0x77 1M 3M", "flush"), "degraded write");
        await victim.StartAsync([], ReplicatedVolumeFixture.ProcessTimeout);
        await volume.WaitForStatusAsync(s => s.AllActive, TimeSpan.FromSeconds(90), "the restarted replica is repaired and active");
        AssertQemuIoClean(await RealClient.QemuIoAsync(volume.Uri, "read -P 0x77 1M 3M"), "read after repair");
        await AssertReplicasConvergedAsync(volume);
    }
}

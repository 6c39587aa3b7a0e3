using Microsoft.Extensions.Time.Testing;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>A replica that answers Hello with nonsense is left out; it never crashes or bricks the upstairs.</summary>
[CancelAfter(30_000)]
public sealed class HostileReplicaTests
{
    [Test]
    public async Task A_replica_reporting_highest_generation_2_pow_64_minus_1_is_left_out_and_the_generation_never_wraps_to_0()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        cluster.Replicas[0].HighestGeneration = ulong.MaxValue;
        cluster.Replicas[1].HighestGeneration = 4;
        cluster.Replicas[2].HighestGeneration = 3;

        ReplicatedVolume volume = await cluster.StartAdvancingAsync(clock, Cluster.Options() with { StartupWaitForAll = TimeSpan.FromMilliseconds(300) });

        Assert.That(volume.Generation, Is.EqualTo(5UL), "one above the highest of the replicas that make sense");
        Assert.That(volume.GetStatus().InService, Is.EqualTo(2));
        Assert.That(cluster.Replicas.SelectMany(r => r.Hellos).Where(h => !h.ReadOnly).Select(h => h.Generation), Has.None.EqualTo(0UL));
        Assert.That(cluster.Log.Warnings, Has.Some.Contains("misbehaving").And.Contains("generation"));
        await cluster.WriteAsync(3, 1);
        Assert.That(await cluster.ReadAsync(3), Is.EqualTo(Cluster.Pattern(1, 3)));
    }

    // At the ceiling the Hello reply itself is refused (the replica stays out until it stops claiming
    // it); below the ceiling but beyond the flush step it is left out of activation, then live repair
    // replaces its copy with the honest one.
    [TestCase(Wire.MaxFlushNumber, false, TestName = "A replica claiming flush number 2^63-1 for an extent is left out and flushes keep working")]
    [TestCase(Wire.MaxFlushNumber - 1, true, TestName = "A replica claiming flush number 2^63-2 for an extent is left out, flushes keep working and its copy is repaired")]
    [TestCase(1UL << 62, true, TestName = "A replica claiming flush number 2^62 for an extent is left out, flushes keep working and its copy is repaired")]
    public async Task A_replica_claiming_an_implausible_flush_number_is_left_out_and_flushes_keep_working(ulong claimed, bool repairable)
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        const int Extent = 5;
        foreach (FakeReplica r in cluster.Replicas)
        {
            r.HighestGeneration = 3;
            r.SetExtent(Extent, 0x50, new ExtentMeta(3, 40, false));
        }
        // The attack: one Hello reply claiming (its highest generation, a flush number at or near the
        // ceiling) for one extent. Adopted, it would be copied onto the honest replicas and every later
        // flush number would be refused.
        cluster.Replicas[0].SetExtent(Extent, 0x66, new ExtentMeta(3, claimed, false));

        ReplicatedVolume volume = await cluster.StartAdvancingAsync(clock, Cluster.Options() with { StartupWaitForAll = TimeSpan.FromMilliseconds(300) });

        Assert.That(volume.GetStatus().FlushNumber, Is.EqualTo(40UL), "continued from the honest replicas");
        Assert.That(cluster.Replicas[1].Meta(Extent), Is.EqualTo(new ExtentMeta(3, 40, false)), "nothing planted on replica 1");
        Assert.That(cluster.Replicas[2].Meta(Extent), Is.EqualTo(new ExtentMeta(3, 40, false)), "nothing planted on replica 2");
        Assert.That(cluster.Log.Warnings, Has.Some.Contains("misbehaving").And.Contains("flush number"));
        long block = (long)Extent * Cluster.ExtentBlocks;
        await cluster.WriteAsync(block, 1);
        await cluster.FlushAsync();
        Assert.That(volume.GetStatus().FlushNumber, Is.EqualTo(41UL));
        Assert.That(await cluster.ReadAsync(block), Is.EqualTo(Cluster.Pattern(1, block)));
        if (!repairable)
        {
            Assert.That(cluster.Status(0).State, Is.Not.EqualTo(ReplicaState.Active), "a Hello reply at the ceiling is never used");
            Assert.That(volume.GetStatus().InService, Is.EqualTo(2));
            return;
        }
        // The liar is brought back by live repair with the honest copy, not the other way round.
        await cluster.AdvanceUntilAsync(clock, () => cluster.Volume.GetStatus().Replicas.All(r => r.State == ReplicaState.Active), "all three replicas are active");
        Assert.That(cluster.Replicas[0].Meta(Extent), Is.EqualTo(cluster.Replicas[1].Meta(Extent)));
        Assert.That(cluster.Replicas.Select(r => r.Meta(Extent).FlushNumber), Is.All.LessThanOrEqualTo(41UL));
        await cluster.WriteAsync(block + 1, 2);
        await cluster.FlushAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task A_replica_reporting_generation_2_pow_63_minus_2_is_left_out_and_the_others_activate_at_their_next_generation()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        // Passes the absolute check, but following it would send Hello 2^63 - 1, which every honest
        // downstairs refuses (far beyond its generation step): startup would fail on every restart.
        cluster.Replicas[0].HighestGeneration = Wire.MaxGeneration - 1;
        cluster.Replicas[1].HighestGeneration = 3;
        cluster.Replicas[2].HighestGeneration = 3;

        ReplicatedVolume volume = await cluster.StartAdvancingAsync(clock, Cluster.Options() with { StartupWaitForAll = TimeSpan.FromMilliseconds(300) });

        Assert.That(volume.Generation, Is.EqualTo(4UL));
        Assert.That(cluster.Replicas[1].HighestGeneration, Is.EqualTo(4UL));
        Assert.That(cluster.Replicas[2].HighestGeneration, Is.EqualTo(4UL));
        Assert.That(cluster.Replicas.SelectMany(r => r.Hellos).Where(h => !h.ReadOnly).Select(h => h.Generation), Is.All.EqualTo(4UL));
        Assert.That(cluster.Log.Warnings, Has.Some.Contains("misbehaving").And.Contains("generation"));
        Assert.That(volume.GetStatus().InService, Is.EqualTo(2));
        await cluster.WriteAsync(3, 1);
        await cluster.FlushAsync();
        Assert.That(await cluster.ReadAsync(3), Is.EqualTo(Cluster.Pattern(1, 3)));
    }

    [Test]
    public async Task One_replica_refusing_the_activation_Hello_does_not_stop_the_other_two_from_starting()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        // Replica 0 was away while the others moved on; its operator set a small generation step, so
        // it refuses generation 11 (8 above its 3). The other two are enough to serve.
        cluster.Replicas[0].HighestGeneration = 3;
        cluster.Replicas[0].MaxGenerationStep = 2;
        cluster.Replicas[1].HighestGeneration = 10;
        cluster.Replicas[2].HighestGeneration = 10;

        ReplicatedVolume volume = await cluster.StartAdvancingAsync(clock, Cluster.Options() with { StartupWaitForAll = TimeSpan.FromMilliseconds(300) });

        Assert.That(volume.Generation, Is.EqualTo(11UL));
        Assert.That(volume.GetStatus().InService, Is.EqualTo(2));
        Assert.That(cluster.Log.Warnings, Has.Some.Contains("replica 0").And.Contains("refused"));
        await cluster.WriteAsync(3, 1);
        await cluster.FlushAsync();
        Assert.That(await cluster.ReadAsync(3), Is.EqualTo(Cluster.Pattern(1, 3)));
        Assert.That(cluster.Replicas[0].HighestGeneration, Is.EqualTo(3UL), "the refusing replica recorded nothing");
    }

    [Test]
    public async Task A_repair_source_lying_about_extent_metadata_plants_nothing_and_the_repair_uses_another_source()
    {
        await using var cluster = new Cluster();
        ReplicatedVolume volume = await cluster.StartAsync();
        await cluster.WaitForAllActiveAsync();
        // Replica 2 misses a write and a flush; replica 0 (the first repair source) then lies in its
        // extent reads. Replica 2 stands for a downstairs without a flush step of its own.
        cluster.Replicas[2].Reachable = false;
        cluster.Replicas[2].MaxFlushStep = ulong.MaxValue;
        cluster.Replicas[2].DropConnection();
        await cluster.WriteAsync(9, 1); // finds the connection gone: replica 2 is faulted
        await Cluster.WaitUntilAsync(() => cluster.Status(2).State == ReplicaState.Faulted, "replica 2 is out of service");
        await cluster.FlushAsync();
        cluster.Replicas[0].ExtentReadMetaLie = new ExtentMeta(volume.Generation, Wire.MaxFlushNumber - 1, false);
        cluster.Replicas[2].Reachable = true;

        await cluster.WaitForStateAsync(2, ReplicaState.Active);

        Assert.That(cluster.Replicas[2].Snapshot().Meta.Select(m => m.FlushNumber), Is.All.LessThanOrEqualTo(volume.GetStatus().FlushNumber));
        Assert.That(cluster.Log.Warnings, Has.Some.Contains("misbehaving"));
        Assert.That(await cluster.ReadAsync(9), Is.EqualTo(Cluster.Pattern(1, 9)));
        cluster.Replicas[0].ExtentReadMetaLie = null;
        await cluster.WriteAsync(10, 2);
        await cluster.FlushAsync();
        Assert.That(volume.GetStatus().InService, Is.EqualTo(3));
    }

    [Test]
    public async Task An_explicit_generation_above_the_maximum_is_refused_at_start()
    {
        await using var cluster = new Cluster();
        Assert.That(async () => await cluster.StartAsync(Cluster.Options() with { Generation = ulong.MaxValue }),
            Throws.ArgumentException.With.Message.Contains("Generation"));
        Assert.That(cluster.Replicas.SelectMany(r => r.Hellos).Where(h => !h.ReadOnly), Is.Empty);
    }
}

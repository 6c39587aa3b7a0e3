using NbdServer.Downstairs.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>A replica that answers Hello with nonsense is left out; it never crashes or bricks the upstairs.</summary>
[CancelAfter(30_000)]
public sealed class HostileReplicaTests
{
    [Test]
    public async Task A_replica_reporting_highest_generation_2_pow_64_minus_1_is_left_out_and_the_generation_never_wraps_to_0()
    {
        await using var cluster = new Cluster();
        cluster.Replicas[0].HighestGeneration = ulong.MaxValue;
        cluster.Replicas[1].HighestGeneration = 4;
        cluster.Replicas[2].HighestGeneration = 3;

        ReplicatedVolume volume = await cluster.StartAsync(Cluster.Options() with { StartupWaitForAll = TimeSpan.FromMilliseconds(300) });

        Assert.That(volume.Generation, Is.EqualTo(5UL), "one above the highest of the replicas that make sense");
        Assert.That(volume.GetStatus().InService, Is.EqualTo(2));
        Assert.That(cluster.Replicas.SelectMany(r => r.Hellos).Where(h => !h.ReadOnly).Select(h => h.Generation), Has.None.EqualTo(0UL));
        Assert.That(cluster.Log.Warnings, Has.Some.Contains("misbehaving").And.Contains("generation"));
        await cluster.WriteAsync(3, 1);
        Assert.That(await cluster.ReadAsync(3), Is.EqualTo(Cluster.Pattern(1, 3)));
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

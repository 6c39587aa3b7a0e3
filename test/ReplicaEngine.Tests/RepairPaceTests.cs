using Microsoft.Extensions.Time.Testing;

namespace NbdServer.ReplicaEngine.Tests;

/// <summary>
/// The repair rate limit holds a repair to the operator's pace on the engine's clock, and a change
/// made while a repair runs applies to that repair.
/// </summary>
[CancelAfter(45_000)]
public sealed class RepairPaceTests
{
    private const double KiB = 1.0 / 1024; // in MiB, the pace's unit

    /// <summary>Replica 2 misses one whole-extent write to every extent: 16 × 4 KiB to catch up.</summary>
    private static async Task<FakeReplica> MissEveryExtentAsync(Cluster cluster)
    {
        FakeReplica away = cluster.Replicas[2];
        away.Reachable = false;
        away.DropConnection();
        await cluster.WriteAsync(0, 1, blocks: Cluster.ExtentBlocks);
        await Cluster.WaitUntilAsync(() => cluster.Status(2).State == ReplicaState.Faulted, "replica 2 is out");
        for (int e = 1; e < Cluster.ExtentCount; e++)
        {
            await cluster.WriteAsync((long)e * Cluster.ExtentBlocks, 1 + e, blocks: Cluster.ExtentBlocks);
        }
        await cluster.FlushAsync();
        return away;
    }

    [Test]
    public async Task A_rate_limited_repair_takes_at_least_its_bytes_over_the_rate_on_the_engine_clock()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { RepairRateLimit = 16 * KiB }, clock);
        FakeReplica away = await MissEveryExtentAsync(cluster);

        DateTimeOffset back = clock.GetUtcNow();
        away.Reachable = true;
        await cluster.AdvanceUntilAsync(clock, () => cluster.Status(2).State == ReplicaState.Active, "replica 2 is repaired");
        TimeSpan took = clock.GetUtcNow() - back;

        // Sixteen 4 KiB copies at 16 KiB/s: the last may start 15 × 0.25 s after the first, which may
        // start one second early (the burst an idle throttle allows): 2.75 s at the least.
        Assert.That(cluster.Status(2).RepairBytesCopied, Is.EqualTo(Cluster.ExtentCount * Cluster.ExtentBytes));
        Assert.That(took, Is.GreaterThanOrEqualTo(TimeSpan.FromSeconds(2.75)), "the repair kept to 16 KiB/s");
        Assert.That(took, Is.LessThan(TimeSpan.FromSeconds(8)), "and did not crawl far below it");
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task Lifting_the_limit_while_a_repair_crawls_lets_that_repair_finish_at_once()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { RepairRateLimit = 1 * KiB }, clock); // 64 s for 64 KiB
        FakeReplica away = await MissEveryExtentAsync(cluster);
        away.Reachable = true;
        await cluster.AdvanceUntilAsync(clock, () => cluster.Status(2).RepairBytesCopied > 0, "the repair has begun");
        DateTimeOffset lifted = clock.GetUtcNow();

        Assert.That(cluster.Volume.SetRepairPace(-1, null), Does.Contain("rate limit"), "a negative rate is refused");
        Assert.That(cluster.Volume.SetRepairPace(null, 0), Does.Contain("duty cycle"), "a zero duty cycle is refused");
        Assert.That(cluster.Volume.GetStatus().RepairRateLimit, Is.EqualTo(1 * KiB), "a refused change changes nothing");
        Assert.That(cluster.Volume.SetRepairPace(0, 0.25), Is.Null);
        Assert.That((cluster.Volume.GetStatus().RepairRateLimit, cluster.Volume.GetStatus().RepairDutyCycle), Is.EqualTo((0.0, 0.25)));
        Assert.That(cluster.Log.Lines.Count(l => l.Level == Microsoft.Extensions.Logging.LogLevel.Information && l.Message.Contains("Repair pace set: no rate limit, duty cycle 0.25", StringComparison.Ordinal)), Is.EqualTo(1));

        await cluster.AdvanceUntilAsync(clock, () => cluster.Status(2).State == ReplicaState.Active, "replica 2 is repaired");
        // Copies already waiting for their slot keep it (at most one chunk each); the rest run unpaced.
        Assert.That(clock.GetUtcNow() - lifted, Is.LessThan(TimeSpan.FromSeconds(20)), "the running repair took the new pace");
        await cluster.WaitForIdleAsync();
        cluster.AssertReplicasIdentical();
    }
}

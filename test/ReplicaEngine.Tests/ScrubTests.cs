using Microsoft.Extensions.Time.Testing;

namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(30_000)]
public sealed class ScrubTests
{
    [Test]
    public async Task Scrub_finds_rot_in_copies_no_read_touched_and_repairs_it_from_a_good_copy()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(3, 1, blocks: 4);
        await cluster.WriteAsync(60, 2, blocks: 2);
        await cluster.FlushAsync();
        cluster.Replicas[1].CorruptBlock(4);
        cluster.Replicas[2].CorruptBlock(61);

        await cluster.Volume.StartScrub().WaitAsync(TimeSpan.FromSeconds(20));

        ScrubStatus scrub = cluster.Volume.Scrub;
        Assert.That((scrub.Running, scrub.Problem, scrub.ExtentsDone, scrub.BlocksRepaired), Is.EqualTo((false, (string?)null, scrub.ExtentTotal, 2L)));
        Assert.That(scrub.BlocksChecked, Is.EqualTo(3L * scrub.ExtentTotal * 8), "every block of every replica (8 blocks per extent here)");
        Assert.That(cluster.Replicas[1].ReadBlock(4), Is.EqualTo(Cluster.Pattern(1, 4)));
        Assert.That(cluster.Replicas[2].ReadBlock(61), Is.EqualTo(Cluster.Pattern(2, 61)));
        Assert.That(cluster.Volume.GetStatus().Replicas.Select(r => r.State), Is.All.EqualTo(ReplicaState.Active), "rot is repaired, not a fault");
        await cluster.FlushAsync();
        cluster.AssertReplicasIdentical(includeMeta: false);
    }

    [Test]
    public async Task Scrub_of_a_healthy_volume_checks_everything_and_repairs_nothing()
    {
        await using var cluster = new Cluster();
        await cluster.StartAsync();
        await cluster.WriteAsync(10, 5, blocks: 8);
        await cluster.Volume.StartScrub().WaitAsync(TimeSpan.FromSeconds(20));
        ScrubStatus scrub = cluster.Volume.Scrub;
        Assert.That((scrub.BlocksRepaired, scrub.Problem, scrub.ExtentsDone), Is.EqualTo((0L, (string?)null, scrub.ExtentTotal)));
        Assert.That(cluster.Replicas[0].ReadBlock(12), Is.EqualTo(Cluster.Pattern(5, 12)));
    }

    [Test]
    public async Task The_volume_scrubs_itself_every_scrub_interval_without_being_asked()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        TimeSpan interval = TimeSpan.FromSeconds(30);
        await cluster.StartAsync(Cluster.Options() with { ScrubInterval = interval }, clock);
        await cluster.WriteAsync(20, 7, blocks: 2);
        await cluster.FlushAsync();
        await cluster.WaitForIdleAsync();
        cluster.Replicas[0].CorruptBlock(21);

        Cluster.Advance(clock, interval - TimeSpan.FromSeconds(1));
        Assert.That((cluster.Volume.Scrub.Running, cluster.Volume.Scrub.ExtentsDone), Is.EqualTo((false, 0)), "no scrub before the interval");
        await cluster.AdvanceUntilAsync(clock, () => cluster.Volume.Scrub.BlocksRepaired == 1 && !cluster.Volume.Scrub.Running, "a periodic scrub repaired the rotted copy");
        Assert.That(cluster.Volume.ScrubTotals, Is.EqualTo((cluster.Volume.Scrub.BlocksChecked, 1L)), "the metrics' totals count what the scrub did");
        Assert.That(cluster.Replicas[0].ReadBlock(21), Is.EqualTo(Cluster.Pattern(7, 21)));
    }

    [Test]
    public async Task With_a_zero_scrub_interval_nothing_scrubs_on_its_own()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        await cluster.StartAsync(Cluster.Options() with { ScrubInterval = TimeSpan.Zero }, clock);
        await cluster.WriteAsync(20, 7);
        await cluster.WaitForIdleAsync();
        cluster.Replicas[0].CorruptBlock(20);
        Cluster.Advance(clock, new EngineOptions().ScrubInterval + TimeSpan.FromHours(1)); // past the default interval
        await cluster.RepliesAppliedAsync();
        Assert.That(cluster.Volume.Scrub.ExtentsDone, Is.Zero, "no scrub ran");
        Assert.That(cluster.Replicas[0].ReadBlock(20), Is.Not.EqualTo(Cluster.Pattern(7, 20)), "the rot is still there");
    }
}

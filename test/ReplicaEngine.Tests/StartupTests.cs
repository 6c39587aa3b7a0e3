using Microsoft.Extensions.Time.Testing;
using NbdServer.Protocol;

namespace NbdServer.ReplicaEngine.Tests;

[CancelAfter(30_000)]
public sealed class StartupTests
{
    private static byte[] ExtentContent(FakeReplica replica, int extent) =>
        [.. Enumerable.Range(0, Cluster.ExtentBlocks).SelectMany(b => replica.ReadBlock(((long)extent * Cluster.ExtentBlocks) + b))];

    [Test]
    public async Task Reconciliation_copies_the_highest_generation_then_highest_flush_to_the_others()
    {
        await using var cluster = new Cluster();
        FakeReplica[] r = cluster.Replicas;
        // Extent 0: same generation, replica 1 has the highest flush.
        r[0].SetExtent(0, 0xA0, new ExtentMeta(3, 5, false));
        r[1].SetExtent(0, 0xA1, new ExtentMeta(3, 7, false));
        r[2].SetExtent(0, 0xA2, new ExtentMeta(2, 9, false));
        // Extent 1: replica 0's higher generation beats the others' higher flush.
        r[0].SetExtent(1, 0xB0, new ExtentMeta(4, 1, false));
        r[1].SetExtent(1, 0xB1, new ExtentMeta(3, 9, false));
        r[2].SetExtent(1, 0xB1, new ExtentMeta(3, 9, false));
        // Extent 2: replica 2 alone is ahead.
        r[0].SetExtent(2, 0xC0, new ExtentMeta(1, 1, false));
        r[1].SetExtent(2, 0xC0, new ExtentMeta(1, 1, false));
        r[2].SetExtent(2, 0xC2, new ExtentMeta(1, 2, false));
        // Extent 3: all agree: nothing to copy.
        for (int i = 0; i < 3; i++)
        {
            r[i].SetExtent(3, 0xD0, new ExtentMeta(2, 4, false));
            r[i].HighestGeneration = 4;
        }
        byte[] winner0 = ExtentContent(r[1], 0);
        byte[] winner1 = ExtentContent(r[0], 1);
        byte[] winner2 = ExtentContent(r[2], 2);

        await cluster.StartAsync();

        foreach (FakeReplica replica in r)
        {
            Assert.That(ExtentContent(replica, 0), Is.EqualTo(winner0), $"extent 0 on replica {replica.Index}");
            Assert.That(ExtentContent(replica, 1), Is.EqualTo(winner1), $"extent 1 on replica {replica.Index}");
            Assert.That(ExtentContent(replica, 2), Is.EqualTo(winner2), $"extent 2 on replica {replica.Index}");
            Assert.That(replica.Meta(0), Is.EqualTo(new ExtentMeta(3, 7, false)));
            Assert.That(replica.Meta(1), Is.EqualTo(new ExtentMeta(4, 1, false)));
            Assert.That(replica.Meta(2), Is.EqualTo(new ExtentMeta(1, 2, false)));
        }
        var commits = r.Select(x => x.Received.Where(o => o.Kind == OpKind.ExtentCommit).Select(o => (int)(o.FirstBlock / Cluster.ExtentBlocks)).Order().ToArray()).ToArray();
        Assert.That(commits[0], Is.EqualTo(new[] { 0, 2 }), "replica 0 receives extents 0 and 2");
        Assert.That(commits[1], Is.EqualTo(new[] { 1, 2 }), "replica 1 receives extents 1 and 2");
        Assert.That(commits[2], Is.EqualTo(new[] { 0, 1 }), "replica 2 receives extents 0 and 1");
        cluster.AssertReplicasIdentical();

        // The guest's next flush is stamped above every reconciled stamp: a new generation, a higher flush number.
        await cluster.WriteAsync(100, 1);
        await cluster.FlushAsync();
        Assert.That(r[0].Received.Last(o => o.Kind == OpKind.Flush).FlushNumber, Is.GreaterThan(7UL));
        Assert.That(r[0].Meta(100 / Cluster.ExtentBlocks).Generation, Is.EqualTo(5UL));
    }

    [Test]
    public async Task Reconciliation_repairs_dirty_extents_so_all_replicas_agree_before_the_guest_reads()
    {
        await using var cluster = new Cluster();
        FakeReplica[] r = cluster.Replicas;
        // Same stamp everywhere, but replica 2 was written after its last flush (a crash mid-write).
        for (int i = 0; i < 3; i++)
        {
            r[i].SetExtent(5, 0x50, new ExtentMeta(2, 3, false));
        }
        r[2].SetExtent(5, 0x5F, new ExtentMeta(2, 3, true));

        await cluster.StartAsync();

        cluster.AssertReplicasIdentical(includeMeta: false);
        byte[] seen = await cluster.ReadAsync(5 * Cluster.ExtentBlocks, Cluster.ExtentBlocks);
        Assert.That(seen, Is.EqualTo(ExtentContent(r[0], 5)));
        var copied = r.Select(x => x.Received.Count(o => o.Kind == OpKind.ExtentCommit)).Sum();
        Assert.That(copied, Is.EqualTo(2), "the dirty extent was copied to the two other replicas");

        // The next flush makes the extent clean again everywhere.
        await cluster.FlushAsync();
        Assert.That(r.Select(x => x.Meta(5).Dirty), Is.All.False);
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task The_generation_is_one_above_the_highest_any_replica_has_seen()
    {
        await using var cluster = new Cluster();
        cluster.Replicas[0].HighestGeneration = 3;
        cluster.Replicas[1].HighestGeneration = 7;
        cluster.Replicas[2].HighestGeneration = 5;

        ReplicatedVolume volume = await cluster.StartAsync();

        Assert.That(volume.Generation, Is.EqualTo(8UL));
        Assert.That(cluster.Replicas.Select(x => x.HighestGeneration), Is.All.EqualTo(8UL), "every replica fenced older upstairs");
        Assert.That(cluster.Replicas.Select(x => x.Hellos.Last().Generation), Is.All.EqualTo(8UL));
        Assert.That(volume.GetStatus().Generation, Is.EqualTo(8UL));
    }

    [Test]
    public async Task An_explicit_generation_below_one_a_replica_has_seen_is_refused()
    {
        await using var cluster = new Cluster();
        cluster.Replicas[1].HighestGeneration = 7;

        Assert.That(async () => await cluster.StartAsync(Cluster.Options() with { Generation = 6 }),
            Throws.InvalidOperationException.With.Message.Contains("generation 6 is older"));
        Assert.That(cluster.Replicas.SelectMany(x => x.Hellos).Where(h => !h.ReadOnly), Is.Empty, "no read-write connection was attempted");
    }

    [Test]
    public async Task An_explicit_higher_generation_is_used()
    {
        await using var cluster = new Cluster();
        cluster.Replicas[1].HighestGeneration = 7;
        ReplicatedVolume volume = await cluster.StartAsync(Cluster.Options() with { Generation = 20 });
        Assert.That(volume.Generation, Is.EqualTo(20UL));
        Assert.That(cluster.Replicas.Select(x => x.HighestGeneration), Is.All.EqualTo(20UL));
    }

    [Test]
    public async Task Startup_with_two_reachable_serves_the_guest_and_repairs_the_third_when_it_appears()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        cluster.Replicas[2].Reachable = false;
        ReplicatedVolume volume = await cluster.StartAdvancingAsync(clock, Cluster.Options() with { StartupWaitForAll = TimeSpan.FromMilliseconds(300) });

        Assert.That(volume.GetStatus().InService, Is.EqualTo(2));
        Assert.That(cluster.Status(2).State, Is.Not.EqualTo(ReplicaState.Active));
        for (int i = 0; i < 6; i++)
        {
            await cluster.WriteAsync(i * 20, i + 1, blocks: 2);
        }
        await cluster.FlushAsync();
        await cluster.WriteAsync(3, 99); // written after the last flush

        // Startup's read-only probing ended with startup; only the reconnect loop keeps trying.
        // Three reconnect attempts: each waits at most ReconnectMaxDelay, as a probe retry would.
        int probes = cluster.Replicas[2].Hellos.Count(h => h.ReadOnly);
        int attempts = cluster.Replicas[2].Hellos.Count(h => !h.ReadOnly);
        await cluster.AdvanceUntilAsync(clock, () => cluster.Replicas[2].Hellos.Count(h => !h.ReadOnly) >= attempts + 3, "the reconnect loop tried three more times");
        Assert.That(cluster.Replicas[2].Hellos.Count(h => h.ReadOnly), Is.EqualTo(probes), "startup probes still running");

        cluster.Replicas[2].Reachable = true;
        await cluster.AdvanceUntilAsync(clock, () => cluster.Status(2).State == ReplicaState.Active, "replica 2 is repaired and in service");
        Assert.That(cluster.Replicas[2].HighestGeneration, Is.EqualTo(volume.Generation));
        await cluster.FlushAsync();
        cluster.AssertReplicasIdentical();
    }

    [Test]
    public async Task Startup_fails_when_fewer_than_two_replicas_are_reachable()
    {
        var clock = new FakeTimeProvider();
        await using var cluster = new Cluster();
        cluster.Replicas[1].Reachable = false;
        cluster.Replicas[2].Reachable = false;
        EngineOptions options = Cluster.Options() with { StartupWaitForAll = TimeSpan.FromMilliseconds(200), StartupTimeout = TimeSpan.FromMilliseconds(800) };

        Assert.That(async () => await cluster.StartAdvancingAsync(clock, options),
            Throws.InvalidOperationException.With.Message.Contains("fewer than two downstairs reachable"));
        Assert.That(cluster.Replicas[1].Hellos, Has.Count.GreaterThan(1), "startup kept probing until it gave up");
        int hellos = cluster.Replicas[1].Hellos.Count;
        // Ten times the longest probe backoff, a tick at a time, with a moment for a probe loop to run after each.
        for (int i = 0; i < 10 * options.ReconnectMaxDelay / Engine.TickInterval; i++)
        {
            clock.Advance(Engine.TickInterval);
            await Task.Delay(1);
        }
        Assert.That(cluster.Replicas[1].Hellos, Has.Count.EqualTo(hellos), "no probing goes on after startup gave up");
    }

    [Test]
    public async Task A_long_reconciliation_shows_its_progress_in_the_status_before_the_volume_serves()
    {
        await using var cluster = new Cluster();
        FakeReplica[] r = cluster.Replicas;
        r[0].SetExtent(2, 0xC0, new ExtentMeta(1, 1, false));
        r[1].SetExtent(2, 0xC0, new ExtentMeta(1, 1, false));
        r[2].SetExtent(2, 0xC2, new ExtentMeta(1, 2, false)); // replica 2 alone is ahead: the others get its copy
        r[0].Hold(OpKind.ExtentWrite);

        ReplicatedVolume? early = null;
        using var cts = new CancellationTokenSource(Cluster.Patience);
        Task<ReplicatedVolume> starting = ReplicatedVolume.StartAsync(Cluster.Options(), cluster.Log, cluster.Connector, cts.Token, created: v => early = v);
        await Cluster.WaitUntilAsync(() => early?.GetStatus().Startup is { Phase: "reconciling" }, "startup reports reconciling");
        StartupStatus progress = early!.GetStatus().Startup!;
        Assert.That((progress.ExtentsDone, progress.ExtentTotal), Is.EqualTo((0, 2)), "held at the first of extent 2's two copies");
        Assert.That(early.StartScrub().IsCompleted, Is.True, "no scrub before the volume serves");
        Assert.That(starting.IsCompleted, Is.False);

        r[0].Release();
        await using ReplicatedVolume volume = await starting;
        Assert.That(volume, Is.SameAs(early));
        Assert.That(volume.GetStatus().Startup, Is.Null, "serving: no startup status");
        Assert.That(r[0].ReadBlock(Cluster.ExtentBlocks * 2), Is.EqualTo(r[2].ReadBlock(Cluster.ExtentBlocks * 2)));
    }
}
